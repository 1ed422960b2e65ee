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


def _choice_error(component, payload, e: gr.Error):
    """Gradio's own choice check, said as one line naming the field, and without a server traceback."""
    name = component.label or "a choice"
    choices = ", ".join(str(c[1] if isinstance(c, tuple) else c) for c in (component.choices or []))
    shown = repr(payload) if len(repr(payload)) <= 80 else repr(payload)[:77] + "..."
    return gr.Error(f"{name}: {shown} is not one of the choices ({choices})", print_exception=False)


class FieldDropdown(gr.Dropdown):
    """A dropdown whose refusal of a value outside its choices names the field and logs no traceback
    (Gradio's check prints one per bad API request)."""

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error as e:
            raise _choice_error(self, payload, e) from None


class FieldRadio(gr.Radio):
    """A radio group whose refusal of a value outside its choices names the field and logs no traceback."""

    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error as e:
            raise _choice_error(self, payload, e) from None
