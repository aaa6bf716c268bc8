"""Named dependencies for the routes: settings, a database session, the store, the queue, the caller (owner)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from functools import cached_property
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from api.errors import ApiError
from helip.db import session_factory
from helip.queue import celery_client
from helip.settings import Settings
from helip.store import Store, store_from_settings

LOCAL_OWNER = "local"


class ServiceContext:
    """What an app instance shares across requests, built lazily so that creating the app connects to nothing."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return session_factory(self.settings)  # embedded SQLite: brings the schema to head first

    @cached_property
    def store(self) -> Store:
        return store_from_settings(self.settings)

    @cached_property
    def celery(self) -> Celery:
        return celery_client(self.settings)

    @cached_property
    def key_owners(self) -> dict[str, str]:
        """Accepted bearer token -> owner id (sha256 of the token: the database never sees a key)."""
        return {k: hashlib.sha256(k.encode()).hexdigest() for k in self.settings.api_key_list()}


def get_context(request: Request) -> ServiceContext:
    return request.app.state.context


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.context.settings


def get_session(context: Annotated[ServiceContext, Depends(get_context)]) -> Iterator[Session]:
    session = context.sessions()
    try:
        yield session
    finally:
        session.close()


def get_store(context: Annotated[ServiceContext, Depends(get_context)]) -> Store:
    return context.store


def get_owner(request: Request, context: Annotated[ServiceContext, Depends(get_context)]) -> str:
    """The caller's owner id. With HELIP_API_KEYS set a valid `Authorization: Bearer <key>` is required."""
    owners = context.key_owners
    if not owners:
        return LOCAL_OWNER
    values = request.headers.getlist("authorization")
    if len(values) > 1:  # the rate limiter refuses these first; never pick one of several credentials
        raise ApiError(400, "duplicate_header", "send one Authorization header, not several", param="Authorization")
    auth = values[0] if values else ""
    scheme, _, token = auth.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    found = None
    for key, owner in owners.items():  # compare against every key: timing does not tell which one matched
        if hmac.compare_digest(key.encode(), token.encode()):
            found = owner
    if found is None:
        raise ApiError(401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return found


ContextDep = Annotated[ServiceContext, Depends(get_context)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[Store, Depends(get_store)]
OwnerDep = Annotated[str, Depends(get_owner)]
