"""S3Diff training: Real-ESRGAN degradations, data, LPIPS, DINO discriminator, accelerate trainer."""
