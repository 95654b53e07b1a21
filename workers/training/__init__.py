"""Training of the project's own small models (torch; never imports ray).

`data` turns synthetic samples into model inputs and labels; `train_base` trains the small
Qwen2.5-VL base model from scratch and writes a loadable model directory.
"""
