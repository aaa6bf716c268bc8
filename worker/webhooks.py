"""The webhook dispatcher: a thread in each worker's main process that delivers job events (helip.webhooks).

Not a task on the job queue: a worker runs one job per GPU, so a delivery queued there would wait hours behind
the job it reports on. The outbox rows make delivery at least once across dispatcher restarts, and the
compare-and-set claims make several workers' dispatchers harmless.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from helip.settings import Settings, get_settings

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
_stop = threading.Event()


def _loop(settings: Settings) -> None:
    from sqlalchemy.orm import sessionmaker

    from helip import db
    from helip.webhooks import dispatch_round

    db.ensure_schema(settings)
    engine = db.make_engine(str(settings.database_url))  # its own engine, like the reaper's: nothing pooled at fork
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    while not _stop.wait(POLL_SECONDS):
        try:
            dispatch_round(settings, sessions)
        except Exception:  # a database hiccup: the outbox keeps everything for the next round
            log.exception("webhook round failed")
        finally:
            engine.dispose()


@worker_ready.connect
def _start(sender=None, **_: object) -> None:
    _stop.clear()
    threading.Thread(target=_loop, args=(get_settings(),), name="helip-webhooks", daemon=True).start()


@worker_shutdown.connect
def _shutdown(sender=None, **_: object) -> None:
    _stop.set()
