"""Alerts to the site's IT team: conditions (what is watched), channels (how it is said) and the
service that evaluates rules on a schedule and sends each alert once (results/models/alerts.py)."""
