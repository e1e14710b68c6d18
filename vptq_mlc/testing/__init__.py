"""Fixtures for tests, benchmarks and the bundled demo: seeded synthetic VPTQ checkpoints and tokenizers. Not
part of any pipeline stage; nothing below the tools layer imports it."""
