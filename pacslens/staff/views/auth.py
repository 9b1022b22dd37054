"""Log in and out. Throttling is django-axes' (settings.AXES_*); audit rows come from auth's signals."""

from __future__ import annotations

from django.contrib.auth import views as auth_views


class LoginView(auth_views.LoginView):
    template_name = "ui/login.html"
    redirect_authenticated_user = True


login = LoginView.as_view()
logout = auth_views.LogoutView.as_view(next_page="login")
