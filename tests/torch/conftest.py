"""The PyTorch bridge: tiny random checkpoints saved by transformers
(``tests.support.torch_models``) and the real Gemma 3 270M."""
