"""`manage.py api_token create NAME --role ROLE [--expires-days N] | issue NAME | revoke NAME [--token HINT] | list`.

A token is printed once (on standard output, alone, so a script can capture it); only its
SHA-256 is kept. Every creation and revocation is in the audit log, by the operating-system user.
"""

from __future__ import annotations

import getpass

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from pacslens.api.models import ApiClient, ApiRole
from pacslens.api.services import api_client_create, api_client_revoke, api_token_issue, api_token_revoke


class Command(BaseCommand):
    help = "Create, revoke or list the clients and bearer tokens of the automation API (/api/v1/)."

    def add_arguments(self, parser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="New client with its first token; prints the token once")
        create.add_argument("name")
        create.add_argument("--role", required=True, choices=ApiRole.values)
        create.add_argument("--description", default="")
        create.add_argument("--expires-days", type=int, default=None, help="Token lifetime (default: no expiry)")
        issue = sub.add_parser("issue", help="Another token for a client (rotation); prints it once")
        issue.add_argument("name")
        issue.add_argument("--expires-days", type=int, default=None)
        revoke = sub.add_parser("revoke", help="Revoke a client and all its tokens, or one token (--token)")
        revoke.add_argument("name")
        revoke.add_argument("--token", default="", help="The token's hint (plapi_xxxx) as `list` shows it")
        sub.add_parser("list", help="Clients, roles, token hints, expiry and last use (never the tokens)")

    def handle(self, *args, **options) -> None:
        actor = f"{getpass.getuser()} (manage.py)"
        action = options["action"]
        try:
            if action == "create":
                _, token = api_client_create(
                    name=options["name"],
                    role=options["role"],
                    description=options["description"],
                    expires_in_days=options["expires_days"],
                    actor=actor,
                )
                self.stderr.write(f"Client {options['name']} created. Its token (shown only now):")
                self.stdout.write(token)
            elif action == "issue":
                _, token = api_token_issue(
                    client=self.client(options["name"]), actor=actor, expires_in_days=options["expires_days"]
                )
                self.stderr.write("New token (shown only now):")
                self.stdout.write(token)
            elif action == "revoke":
                self.revoke(options["name"], options["token"], actor)
            else:
                self.list()
        except ValidationError as exc:
            messages = exc.message_dict.items() if hasattr(exc, "error_dict") else [("", exc.messages)]
            raise CommandError("; ".join(f"{k + ': ' if k else ''}{' '.join(v)}" for k, v in messages)) from None

    def client(self, name: str) -> ApiClient:
        client = ApiClient.objects.filter(name=name).first()
        if client is None:
            raise CommandError(f"no API client named {name!r}")
        return client

    def revoke(self, name: str, hint: str, actor: str) -> None:
        client = self.client(name)
        if hint:
            token = client.tokens.filter(token_hint=hint.rstrip("…")).first()
            if token is None:
                raise CommandError(f"client {name!r} has no token {hint!r}")
            if not api_token_revoke(token=token, actor=actor):
                raise CommandError(f"token {hint} was already revoked")
            self.stdout.write(f"Token {token.token_hint}… of {name} revoked.")
            return
        if not api_client_revoke(client=client, actor=actor):
            raise CommandError(f"client {name!r} was already revoked")
        self.stdout.write(f"Client {name} and all its tokens revoked.")

    def list(self) -> None:
        for client in ApiClient.objects.prefetch_related("tokens"):
            state = f"revoked {client.revoked_at:%Y-%m-%d %H:%M}" if client.revoked_at else "active"
            self.stdout.write(f"{client.name:24} {client.role:20} {state}")
            for token in client.tokens.all():
                expires = f"{token.expires_at:%Y-%m-%d %H:%M}" if token.expires_at else "never"
                used = f"{token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never"
                self.stdout.write(f"    {token.token_hint}…  {token.status:8} expires {expires}  last used {used}")
