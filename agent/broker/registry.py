"""Every session by client id, connected or not: taken over by a reconnect, discarded on
clean start or at expiry, and the will published when its connection ends (after the v5
Will Delay Interval, unless the client is back first). Its timers run on the broker's loop,
armed by ``start`` and cancelled by ``stop``; the sessions themselves survive both."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

from agent.broker.codec import RC_SESSION_TAKEN_OVER
from agent.broker.routing import Router
from agent.broker.sessions import Session, Will, new_message
from agent.broker.subscriptions import SubscriptionIndex
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.broker.connection import Connection

log = get_logger(__name__)


class SessionRegistry:
    def __init__(self, subscriptions: SubscriptionIndex, router: Router) -> None:
        self._subscriptions = subscriptions
        self._router = router
        self._sessions: dict[str, Session] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run timers on ``loop``; offline sessions kept from before count down again."""
        self._loop = loop
        for session in self._sessions.values():
            if session.connection is None and session.expiry_s is not None:
                session.expiry_timer = loop.call_later(
                    session.expiry_s, self._expire, session)

    def stop(self) -> None:
        for session in self._sessions.values():
            session.cancel_timers()

    def attach(self, connection: Connection, client_id: str, clean_start: bool,
               expiry_s: int | None) -> tuple[Session, bool, str | None]:
        """Bind an accepted connection to its session: (session, session present, the
        client id assigned when the client sent none)."""
        assigned_id = None
        if not client_id:
            client_id = assigned_id = f"auto-{uuid.uuid4().hex}"
        session = self._sessions.get(client_id)
        if session is not None:
            if session.connection is not None:
                log.info("broker_session_taken_over", client_id=client_id)
                session.connection.close(RC_SESSION_TAKEN_OVER, end_session=False)
            session.cancel_timers()  # a reconnect cancels session expiry and a delayed will
            if clean_start:
                self._discard(session)
                session = None
        session_present = session is not None
        if session is None:
            session = self._sessions[client_id] = Session(client_id)
        session.expiry_s = expiry_s
        session.connection = connection
        connection.session = session
        return session, session_present, assigned_id

    def detach(self, connection: Connection, publish_will: bool, end_session: bool) -> None:
        """A connection ended: its will, then its session's expiry (unless the session
        outlives this, as on takeover and broker stop)."""
        session = connection.session
        if session is None or session.connection is not connection:
            return
        session.connection = None
        will, connection.will = connection.will, None
        log.debug("broker_client_disconnected", client_id=session.client_id,
                  will=bool(will and publish_will))
        if will is not None and publish_will:
            delay_s = will.delay_s if session.expiry_s is None else min(will.delay_s,
                                                                         session.expiry_s)
            if delay_s:
                session.will_timer = self._loop.call_later(
                    delay_s, self._publish_will, session, will)
            else:
                self._publish_will(session, will)
        if not end_session:
            return
        if session.expiry_s == 0:
            self._discard(session)
        elif session.expiry_s is not None:
            session.expiry_timer = self._loop.call_later(
                session.expiry_s, self._expire, session)

    def _publish_will(self, session: Session, will: Will) -> None:
        session.will_timer = None
        self._router.publish(new_message(will.topic, will.payload, will.qos, will.retain,
                                         will.properties, session.client_id, self._loop.time()))

    def _expire(self, session: Session) -> None:
        session.expiry_timer = None
        if session.connection is None and self._sessions.get(session.client_id) is session:
            log.debug("broker_session_expired", client_id=session.client_id)
            self._discard(session)

    def _discard(self, session: Session) -> None:
        self._subscriptions.remove_session(session)
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
