"""Exports beyond a run's own `model/` folder: ONNX files (`onnx.py`) and Hub model cards (`card.py`)."""
