"""The `s3diff` command line: thin entry points over `model`, `service` and `training`."""
