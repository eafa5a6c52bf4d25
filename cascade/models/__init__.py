"""What a model is and where it comes from: its config and units (torch-free), its checkpoint
files, its tokenizer, and the generated random models that tests and benchmarks use."""
