"""From the champion to something that runs: BentoML model and Bento, container image, S3 transfer."""
