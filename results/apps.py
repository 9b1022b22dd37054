from django.apps import AppConfig


class ResultsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "results"
    verbose_name = "Results and delivery"

    def ready(self) -> None:
        # The site YAML gains `models` and `routing_rules`, after the AE titles they may refer to.
        from results.config_destinations import DestinationsSection
        from results.config_sections import SECTIONS as RESULTS_SECTIONS
        from routing.config_yaml import SECTIONS

        # destinations last: they refer to AE titles and routing rules.
        for section in [*RESULTS_SECTIONS, DestinationsSection()]:
            if all(existing.name != section.name for existing in SECTIONS):
                SECTIONS.append(section)
