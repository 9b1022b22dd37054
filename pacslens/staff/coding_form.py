"""The coding profile form of a destination (its own page, linked from the Endpoints list).

It shows only the fields of the destination's kind. Besides the model's field checks, it builds
a sample message, resource or SR with the submitted profile (results/deliver/coding.py), so a
profile the receiver's format would refuse is refused here, next to the Save button.
"""

from __future__ import annotations

from django import forms

from results.deliver.coding import coding_profile_problems
from results.models import CodingProfile, Destination
from results.models.coding import ORDER_NUMBER_FIELDS


class CodingProfileForm(forms.ModelForm):
    hl7_order_number_fields = forms.MultipleChoiceField(
        required=False,
        choices=[(name, name) for name in ORDER_NUMBER_FIELDS],
        widget=forms.CheckboxSelectMultiple,
        label="Accession number also in",
        help_text="Placer (ORC-2/OBR-2) and filler (ORC-3/OBR-3) order number, placer field 2 (OBR-19); "
        "the destination's own accession field is set on the destination.",
    )

    class Meta:
        model = CodingProfile
        fields = CodingProfile.value_fields()

    def __init__(self, *args, destination: Destination, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.destination = destination
        self.instance.destination = destination
        wanted = set(CodingProfile.fields_for_kind(destination.kind))
        for name in list(self.fields):
            if name not in wanted:
                del self.fields[name]
        if "hl7_order_number_fields" in self.fields and not self.is_bound:
            self.initial["hl7_order_number_fields"] = self.instance.order_number_fields

    def clean_hl7_order_number_fields(self) -> str:
        return ", ".join(self.cleaned_data.get("hl7_order_number_fields") or [])

    def full_clean(self) -> None:
        super().full_clean()  # the fields, then the values copied onto the instance and its checks
        if self.is_bound and not self.errors:
            for problem in coding_profile_problems(self.instance, self.destination):
                self.add_error(None, problem)
