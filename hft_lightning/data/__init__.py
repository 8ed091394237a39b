"""SFT data: abilities, the tokenizer, tokenisation with masking, and the staged datamodule."""
