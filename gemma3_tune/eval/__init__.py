"""`gemma3-tune eval`: score models, adapters and GGUF files on held-out chats, side by side.

Uses model/ (decoding), data/ (rendering, as in training) and export/ (loading runs and GGUFs);
train/ never imports it (the arrows stay `cli -> eval -> export -> train -> model, data`).
"""
