#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve pyproject.toml's ranges (all extras) to the newest versions
# that fit, with hashes. Run it, then run the test suite before committing the new lock.
# The images install subsets at exactly the lock's versions: serve.txt (no extras, the service
# image) and train.txt (the `train` extra, the training image).
# torch is left out of the lock (installed first, pinned, so the CUDA image can take its CUDA build);
# the project itself is installed from the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "pip-tools>=7.4,<8"
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" python3 -m piptools compile --quiet --upgrade --extra dev --generate-hashes --strip-extras \
    --unsafe-package torch --unsafe-package s3diff-serve \
    --no-emit-index-url --no-emit-find-links -o requirements/lock.txt pyproject.toml
for extra in serve train; do
    extra_flag=()
    [ "$extra" = train ] && extra_flag=(--extra train)
    CUSTOM_COMPILE_COMMAND="scripts/lock.sh" python3 -m piptools compile --quiet "${extra_flag[@]}" --generate-hashes \
        --strip-extras -c requirements/lock.txt --unsafe-package torch --unsafe-package s3diff-serve \
        --no-emit-index-url --no-emit-find-links -o "requirements/$extra.txt" pyproject.toml
done
