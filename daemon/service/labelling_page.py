"""The status site's labelling page at ``/label``: the photos devices sent back, the model's guesses, pick a label.

Served with the status page, on the operator's listener (``server.admin_http`` when the model API faces the
phones), never on the phones' side. Like the status page it is one self-contained document with no
JavaScript: each photo is a form whose buttons are the suggestions (a correction's label first, then the
model's guesses), with every other class in a list and a field for a new one; an answer is committed to
the store (:meth:`daemon.store.examples.Store.answer_photo`) and becomes a training example at once.

The forms carry a token made when the daemon starts: a page on another site cannot make the operator's
browser answer for them (cross-site request forgery), as it could with a bare form POST to 127.0.0.1.
"""

from __future__ import annotations

import hmac
import html
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from daemon.store.examples import Store
from daemon.store.labelling import AnswerError, QueuedPhoto

log = logging.getLogger("sprout.labelling")

SHOWN = 12  # photos on one page: answering one brings the next up
MAX_FORM_BYTES = 4096


class LabellingPage:
    """``/label``, ``/label/photo/<id>`` and ``POST /label/<id>`` over the daemon's store."""

    def __init__(self, store: Store, known: Callable[[], list[str]], max_label_chars: int, model: str):
        self.store = store
        self.known = known  # the classes to offer: the learner's, then those stored
        self.max_label_chars = max_label_chars
        self.model = model
        self.token = secrets.token_urlsafe(24)
        self.answered = 0  # answers given on this page since the daemon started

    def routes(self) -> list[Route]:
        return [
            Route("/label", self.page),
            Route("/label/photo/{id:int}", self.photo),
            Route("/label/{id:int}", self.answer, methods=["POST"]),
        ]

    async def page(self, request: Request) -> HTMLResponse:
        photos, counts = await run_in_threadpool(self.store.labelling_queue, SHOWN)
        known = self.known()
        said = request.query_params.get("said", "")
        e = html.escape
        cards = "".join(self._card(p, known) for p in photos) or (
            "<p>The queue is empty. Devices that opted in send back photos their model was unsure of and photos "
            "their users corrected (docs/devices.md, Photos for labelling).</p>"
        )
        body = (
            f"<h1>Sprout: {e(self.model)}, labelling</h1>"
            f'<p><a href="/">status</a> · {counts["queued"]} queued, {counts["labelled"]} labelled, '
            f"{counts['skipped']} skipped, {counts['dropped']} dropped (oldest, past field.max_queued_photos). "
            "Most useful first: the least sure, and corrections. Each label becomes a training example at once.</p>"
            + (f'<p class="said">{e(said[:300])}</p>' if said else "")
            + cards
        )
        return HTMLResponse(
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>Sprout: {e(self.model)}, labelling</title><style>{_STYLE}</style></head><body>{body}</body></html>",
            headers={"Cache-Control": "no-store"},
        )

    def _card(self, p: QueuedPhoto, known: list[str]) -> str:
        e = html.escape
        suggestions = p.suggestions()
        scores = {g.label: g.score for g in p.guesses}
        buttons = "".join(
            f'<button name="label" value="{e(name)}">{e(name)} '
            f"<small>{'user' if name == p.user_label else f'{scores.get(name, 0):.2f}'}</small></button>"
            for name in suggestions
        )
        others = "".join(f'<option value="{e(k)}">{e(k)}</option>' for k in known if k not in suggestions)
        said = f", the user says <b>{e(p.user_label)}</b>" if p.user_label else ""
        age = max(time.time() - p.received_at, 0) / 3600
        return (
            f'<form class="card" method="post" action="/label/{p.id}">'
            f'<img src="/label/photo/{p.id}" alt="photo {p.id}" width="{min(p.width, 320)}">'
            f"<p>photo {p.id}: {e(p.kind.value)}{said}; model version {p.version}, {age:.1f} h ago, "
            f"priority {p.priority:.2f}</p>"
            f'<input type="hidden" name="token" value="{self.token}">{buttons}'
            + (f'<select name="other"><option value="">other class…</option>{others}</select>' if others else "")
            + f'<input name="new" placeholder="new class" maxlength="{self.max_label_chars}">'
            '<button name="use" value="1">use</button> <button name="skip" value="1">skip</button></form>'
        )

    async def photo(self, request: Request) -> Response:
        found = await run_in_threadpool(self.store.labelling_image, request.path_params["id"])
        if found is None:
            return Response("no such photo in the queue (answered, or dropped)", status_code=404)
        content_type, data = found
        return Response(data, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})

    async def answer(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return Response("form too large", status_code=413)
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}
        if not hmac.compare_digest(form.get("token", "").encode(), self.token.encode()):
            return Response("stale or foreign form: reload /label and answer there", status_code=403)
        photo_id = request.path_params["id"]
        label = None
        if "skip" not in form:
            label = form.get("label") or (form.get("new") or "").strip() or form.get("other") or None
            if label is None:
                return _back(f"photo {photo_id}: pick a label, type a new class, or skip")
        who = f"status page ({request.client.host if request.client else 'unknown'})"
        try:
            await run_in_threadpool(self.store.answer_photo, photo_id, label, who, self.max_label_chars)
        except AnswerError as err:
            return _back(f"not taken: {err}")
        self.answered += 1
        log.info("labelling: photo %d %s on the status page", photo_id, f"labelled {label!r}" if label else "skipped")
        return _back(
            f"photo {photo_id} labelled {label!r}: a training example now" if label else f"photo {photo_id} skipped"
        )


def _back(said: str) -> RedirectResponse:
    # 303: the browser GETs the page again, and a reload does not post the answer twice.
    return RedirectResponse("/label?" + urllib.parse.urlencode({"said": said}), status_code=303)


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { font-size: 1.4em; } .said { background: #eef6ee; padding: 4px 8px; }
.card { display: inline-block; vertical-align: top; width: 340px; margin: 0 12px 18px 0; padding: 8px;
        border: 1px solid #ddd; } .card img { max-width: 320px; display: block; }
.card button { margin: 2px 4px 2px 0; } .card input, .card select { margin: 2px 4px 2px 0; width: 140px; }
"""
