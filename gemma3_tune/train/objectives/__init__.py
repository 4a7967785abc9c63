"""Training objectives other than SFT (whose loss is the model's own: model/loss.py). Each
module turns a batch into what model/loss.py scores; the trainer dispatches on the recipe."""
