"""Number inputs that show their bounds in the browser but leave the range check to the handler.

Gradio's own check answers an API client with "Value 7 is greater than maximum value 1." (no field
named) and logs a traceback; the lab's handlers check the value themselves and say which field.
"""
from __future__ import annotations

import gradio as gr


class FieldNumber(gr.Number):
    """A number box that shows its bounds but leaves range checks to the settings model, whose
    message names the field (Gradio's own check says only 'Value 7 is greater than maximum value 1')."""

    is_template = True

    def preprocess(self, payload):
        return payload


class FieldSlider(gr.Slider):
    is_template = True

    def preprocess(self, payload):
        return payload
