"""The model to train: loading (bitsandbytes), the method (peft), the tokenizer, and what differs between model families."""
