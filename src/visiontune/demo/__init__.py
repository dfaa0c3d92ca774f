"""`visiontune demo`: a Gradio app for any run folder or exported model (handlers.py: what each kind of model
answers, without Gradio; app.py: the page for each kind; serve.py: launching on a local port; space.py: a Hugging
Face Space folder)."""
