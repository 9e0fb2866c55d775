"""ERNIE 4.5 Studio: the Gradio app around the models in `models/`."""
