"""What the tests share: models and batches, the trainer run from a test, the distributed worker."""
