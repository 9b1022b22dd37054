"""Model fields whose errors read the same in the staff forms, the site YAML and the models.

Django's form fields carry their own validators and messages ("Enter a valid 'slug'...",
"Ensure this value is greater than or equal to 0."); these fields hand the form the model's wording.
"""

from __future__ import annotations

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from routing.validators import NAME_MESSAGE, PORT_MESSAGE


class PortField(models.PositiveIntegerField):
    """A TCP port, 1-65535, with one message for every way of getting it wrong."""

    default_validators = [MinValueValidator(1, PORT_MESSAGE), MaxValueValidator(65535, PORT_MESSAGE)]

    def formfield(self, **kwargs):
        messages = {"min_value": PORT_MESSAGE, "max_value": PORT_MESSAGE, **kwargs.pop("error_messages", {})}
        return super().formfield(**{"min_value": 1, "max_value": 65535, "error_messages": messages, **kwargs})


class NameField(models.SlugField):
    """A configuration name used in the UI, the CLI and the YAML: a slug, said in plain words."""

    default_error_messages = {"invalid": NAME_MESSAGE}

    def formfield(self, **kwargs):
        messages = {"invalid": NAME_MESSAGE, **kwargs.pop("error_messages", {})}
        return super().formfield(error_messages=messages, **kwargs)
