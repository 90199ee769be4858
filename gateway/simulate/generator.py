"""Traffic generator: scenarios → timed raw EnableX events + the call state they must produce.

Pure and seeded (no clock, no I/O): `generate(n, seed=…, start=…)` always returns the same
events and the same truth, so a failed comparison can be replayed. Event shapes and quirks
follow `enablex/WIRE.md` and the corpus flows; the truth is worked out from what each
scenario *did* (its own bookkeeping, WIRE.md §5), never by folding the generated events.
Sending them over HTTP lives in `gateway/simulate/sender.py`.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from gateway.wire.schemas import CALL_STATES

# A made-up app id (not hex, so it cannot be mistaken for a real EnableX id).
DEMO_APP_ID = "callgate-demo-app-0000"

# Obviously fictional numbers: +1 555-01xx (reserved for fiction) for our side, and the
# corpus's 919900…-style numbers for customers.
DIDS = ("15555550100", "15555550101", "15555550102")
AGENTS = tuple(f"155555501{n:02d}" for n in range(10, 40))

RECORDING_BASE = "https://api.enablex.io/voice/v1/recording/simulated"

SPEECH_PHRASES = (
    "talk to sales",
    "billing",
    "check my balance",
    "speak to an agent",
    "track my order",
    "cancel my order",
    "yes",
    "No, I'm not available.",
    "reset my password",
    "opening hours",
)


@dataclass(frozen=True)
class Delivery:
    """One HTTP request to make: the raw event and when (event-time ms after start) to send it."""

    send_ms: int
    voice_id: str | None
    payload: dict[str, Any]
    redelivery: bool = False
    index: int = 0  # position of the original event in generation order (redeliveries share it)


@dataclass
class CallTruth:
    """What the projector must show for one call (the `calls` table row, WIRE.md §5)."""

    voice_id: str
    scenario: str
    direction: str
    from_number: str
    to_number: str
    final_state: str | None
    duration_s: int | None
    plays: int
    digits: list[str]
    speech: list[str]
    speech_results: list[str]
    recording_url: str | None
    event_count: int
    broadcast_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        """Truth-file line (kind "call")."""
        row: dict[str, Any] = {"kind": "call", **self.__dict__}
        if row["broadcast_id"] is None:
            del row["broadcast_id"]
        return row


@dataclass
class BroadcastTruth:
    """Broadcast totals as the summary event reports them."""

    broadcast_id: str
    state: str
    successful: int
    failed: int
    legs: list[str]

    def as_json(self) -> dict[str, Any]:
        """Truth-file line (kind "broadcast")."""
        return {"kind": "broadcast", **self.__dict__}


@dataclass
class Simulation:
    """Everything `generate` produced: deliveries in sending order plus the truth."""

    seed: int
    start: datetime
    deliveries: list[Delivery]
    calls: list[CallTruth]
    broadcasts: list[BroadcastTruth]

    @property
    def event_count(self) -> int:
        """Distinct events (redeliveries excluded)."""
        return sum(1 for d in self.deliveries if not d.redelivery)

    @property
    def redeliveries(self) -> int:
        """Requests that repeat an earlier body byte for byte."""
        return sum(1 for d in self.deliveries if d.redelivery)

    @property
    def span_ms(self) -> int:
        """Event-time length of the sending schedule."""
        return max((d.send_ms for d in self.deliveries), default=0)

    def truth_lines(self) -> list[dict[str, Any]]:
        """JSONL rows for `--truth`: every call, then every broadcast."""
        return [c.as_json() for c in self.calls] + [b.as_json() for b in self.broadcasts]


# --------------------------------------------------------------------------- time


def format_time(at: datetime, style: str) -> str:
    """Render an instant the ways EnableX material writes it (all mean the same UTC time)."""
    ms = at.microsecond // 1000
    if style == "minute" and at.second == 0 and ms == 0:
        return at.strftime("%Y-%m-%dT%H:%M") + "-00Z"  # the docs' malformed form
    if style == "ist":
        local = at.astimezone(_IST)
        frac = f".{ms:03d}" if ms else ""
        return local.strftime("%Y-%m-%dT%H:%M:%S") + frac + "+05:30"
    if style == "frac" or ms:
        return at.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms:03d}Z"
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


_IST = timezone(timedelta(hours=5, minutes=30))


# --------------------------------------------------------------------------- building calls


@dataclass
class _Ev:
    at_ms: int
    payload: dict[str, Any]
    tkey: str
    style: str


class _Ids:
    """Seeded id factory so the same seed gives the same voice ids, play ids, urls."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.play = 0
        self.rec = 0

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def hex(self, n: int) -> str:
        return f"{self.rng.getrandbits(4 * n):0{n}x}"

    def play_id(self) -> str:
        self.play += 1
        return f"pl-{self.play:06d}"

    def recording_id(self) -> str:
        self.rec += 1
        return f"rec-{self.hex(6)}-{self.rec:05d}"


class _Call:
    """One call's timeline. Emitting an event also books what it means for the truth."""

    def __init__(
        self,
        gen: _Gen,
        scenario: str,
        direction: str,
        start_ms: int,
        *,
        caller: str,
        callee: str,
        broadcast_id: str | None = None,
    ) -> None:
        self.gen = gen
        self.rng = gen.rng
        self.scenario = scenario
        self.direction = direction
        self.voice_id = gen.ids.uuid()
        self.caller = caller
        self.callee = callee
        self.broadcast_id = broadcast_id
        self.owner_ref = gen.owner_ref if direction == "outbound" else None
        self.t = start_ms
        self.events: list[_Ev] = []
        # bookkeeping for the truth (what happened, by event time)
        self.call_states: list[tuple[int, str]] = []
        self.play_ids: set[str] = set()
        self.digits: list[tuple[int, str]] = []
        self.speech: list[tuple[int, str]] = []
        self.speech_results: list[tuple[int, str]] = []
        self.urls: list[tuple[int, str]] = []

    # --- time
    def wait(self, lo: float, hi: float, whole: bool = False) -> int:
        """Advance the call clock by a random lo..hi seconds (ms resolution)."""
        self.t += max(1, int(self.rng.uniform(lo, hi) * 1000))
        if whole:
            self.t = -(-self.t // 1000) * 1000
        return self.t

    # --- emission
    def emit(
        self,
        kind: str,
        body: dict[str, Any],
        *,
        call_state: str | None = None,
        collected: str | None = None,
        speech: tuple[str, str | None] | None = None,
        vkey: str | None = None,
        tkey: str | None = None,
        at: int | None = None,
        with_parties: bool = False,
    ) -> None:
        """Append one raw event at the call clock; record its meaning for the truth."""
        rng = self.rng
        at_ms = self.t if at is None else at
        if self.events and at_ms <= self.events[-1].at_ms:
            at_ms = self.events[-1].at_ms + 1  # strictly increasing: ties would make order moot
        self.t = max(self.t, at_ms)
        vkey = vkey or ("voice_Id" if rng.random() < 0.03 else "voice_id")
        payload: dict[str, Any] = {vkey: self.voice_id}
        if self.broadcast_id:
            payload["broadcast_id"] = self.broadcast_id
        payload.update(body)
        if with_parties:
            payload.setdefault("from", self.caller)
            payload.setdefault("to", self.callee)
        tkey = tkey or ("timeStamp" if rng.random() < 0.06 else "timestamp")
        self.events.append(_Ev(at_ms, payload, tkey, self.gen.time_style()))
        if kind == "call":
            assert call_state in CALL_STATES, call_state
            self.call_states.append((at_ms, call_state))
        if kind in ("play", "speech") and body.get("play_id"):
            self.play_ids.add(body["play_id"])
        if collected is not None:
            self.digits.append((at_ms, collected))
        if speech is not None:
            result, text = speech
            self.speech_results.append((at_ms, result))
            if result == "recognized" and text:
                self.speech.append((at_ms, text))
        if body.get("recording_url"):
            self.urls.append((at_ms, body["recording_url"]))

    def call(
        self, state: str, *, raw: str | None = None, tkey: str | None = None, **extra: Any
    ) -> None:
        """A call-class event; `raw` is the state as sent when EnableX spells it oddly."""
        body: dict[str, Any] = {"state": raw or state}
        if self.owner_ref:
            body["owner_ref"] = self.owner_ref
        body.update(extra)
        self.emit("call", body, call_state=state, with_parties=True, tkey=tkey)

    def play(
        self,
        prompt_ref: str | None,
        play_id: str,
        playstate: str,
        *,
        collected: str | None = None,
        **extra: Any,
    ) -> None:
        """A play event; `initiated`/`playfinished` sometimes use the docs' `playstateus` typo."""
        key = "playstate"
        if playstate in ("initiated", "playfinished") and self.rng.random() < 0.04:
            key = "playstateus"
        body: dict[str, Any] = {"play_id": play_id, key: playstate}
        if prompt_ref is not None:
            body["prompt_ref"] = prompt_ref
        body.update(extra)
        self.emit("play", body, collected=collected)

    def start_play(self, prompt_ref: str | None) -> str:
        """Play initiated a few hundred ms after the app asked for it; returns the play id."""
        self.wait(0.15, 0.7)
        pid = self.gen.ids.play_id()
        extra: dict[str, Any] = {}
        if self.rng.random() < 0.05:
            extra["result"] = self.rng.choice([0, "0"])  # docs' result code, number or string
        self.play(prompt_ref, pid, "initiated", **extra)
        return pid

    def prompt(self, prompt_ref: str | None, lo: float = 2.0, hi: float = 9.0) -> str:
        """A plain TTS prompt that plays to the end."""
        pid = self.start_play(prompt_ref)
        self.wait(lo, hi)
        self.play(prompt_ref, pid, "playfinished")
        return pid

    def disconnect(self, reason: str = "hangup_by_api", **extra: Any) -> None:
        self.call("disconnected", disconnect_reason=reason, **extra)

    def bridge(self, state: str, agent: str, **extra: Any) -> None:
        """Bridge-leg event: from our DID to the agent, like the corpus."""
        body: dict[str, Any] = {"state": state, "from": self.gen.did(), "to": agent}
        body.update(extra)
        vkey = "voice_Id" if self.rng.random() < 0.3 else None
        self.emit("bridge", body, vkey=vkey)

    # --- truth
    def truth(self) -> CallTruth:
        """Final call state per WIRE.md §5, from the bookkeeping above."""
        states = sorted(self.call_states)
        final = None
        if any(s == "disconnected" for _, s in states):
            final = "disconnected"
        elif states:
            final = states[-1][1]
        connected = [t for t, s in states if s == "connected"]
        disconnected = [t for t, s in states if s == "disconnected"]
        duration = None
        if connected and disconnected:
            duration = (min(disconnected) - min(connected)) // 1000
        urls = sorted(self.urls)
        return CallTruth(
            voice_id=self.voice_id,
            scenario=self.scenario,
            direction=self.direction,
            from_number=self.caller,
            to_number=self.callee,
            final_state=final,
            duration_s=duration,
            plays=len(self.play_ids),
            digits=[d for _, d in sorted(self.digits)],
            speech=[s for _, s in sorted(self.speech)],
            speech_results=[r for _, r in sorted(self.speech_results)],
            recording_url=urls[-1][1] if urls else None,
            event_count=len(self.events),
            broadcast_id=self.broadcast_id,
        )


# --------------------------------------------------------------------------- scenarios


class _Gen:
    def __init__(self, rng: random.Random, owner_ref: str) -> None:
        self.rng = rng
        self.ids = _Ids(rng)
        self.owner_ref = owner_ref

    def did(self) -> str:
        return self.rng.choice(DIDS)

    def customer(self) -> str:
        return f"91990000{self.rng.randint(0, 9999):04d}"

    def agent(self) -> str:
        return self.rng.choice(AGENTS)

    def time_style(self) -> str:
        r = self.rng.random()
        return "frac" if r < 0.05 else "ist" if r < 0.09 else "z"

    def digit_fields(self, digits: str) -> dict[str, Any]:
        """`digit` as an integer when JSON can carry it (incl. 0), else `digit`/`digits` text."""
        rng = self.rng
        as_int = digits.isdigit() and (digits == "0" or not digits.startswith("0"))
        if as_int and rng.random() < 0.4:
            return {"digit": int(digits)}
        return {rng.choice(["digit", "digits"]): digits}

    # ---- inbound
    def inbound(self, scenario: str, start_ms: int) -> _Call:
        c = _Call(self, scenario, "inbound", start_ms, caller=self.customer(), callee=self.did())
        minute = self.rng.random() < 0.15
        if minute:  # on a whole minute, so the docs' `…T12:47-00Z` form is exact
            c.t = -(-c.t // 60000) * 60000
        raw = self.rng.choice(["incomingcall"] * 6 + ["incoming call", "Incomingcall"])
        c.call("incomingcall", raw=raw, channel_id=f"ch-{self.ids.hex(6)}")
        if minute:
            c.events[-1].style = "minute"
        return c

    def answer(self, c: _Call) -> None:
        c.wait(0.5, 3.0)
        c.call("connected")

    def outbound(self, scenario: str, start_ms: int, *, announce: bool = True) -> _Call:
        """initiated (sometimes absent, as in the seeds) → ringing; caller answers separately."""
        c = _Call(self, scenario, "outbound", start_ms, caller=self.did(), callee=self.customer())
        if announce and self.rng.random() < 0.85:
            c.call("initiated")
        c.wait(1.0, 4.0)
        c.call("ringing")
        return c

    def ivr(self, start_ms: int) -> list[_Call]:
        """Inbound IVR: greeting → DTMF menu with timeouts/retries → confirm or give up."""
        rng = self.rng
        c = self.inbound("inbound_ivr", start_ms)
        self.answer(c)
        c.prompt(rng.choice([None, "welcome_prompt", "1"]), 2, 7)
        menu_ref = rng.choice(["2", "voice_menu", "main_menu"])
        timeouts = rng.choices([0, 1, 2, 3, 4], weights=[55, 20, 10, 5, 10])[0]
        for _ in range(min(timeouts, 4)):
            pid = c.start_play(menu_ref)
            c.wait(10, 16)
            c.play(menu_ref, pid, "menutimeout")
        if timeouts >= 4:
            c.prompt(rng.choice(["3", "no_input_bye"]), 3, 7)
            c.wait(0.3, 10)
            c.disconnect()
            return [c]
        pid = c.start_play(menu_ref)
        if rng.random() < 0.08:  # caller hangs up while the menu plays
            c.wait(1, 8)
            c.disconnect("remote_hangup")
            return [c]
        c.wait(2, 9)
        digit = rng.choice("1234567890") if rng.random() < 0.85 else f"{rng.randint(1000, 99999)}"
        c.play(menu_ref, pid, "digitcollected", collected=digit, **self.digit_fields(digit))
        late_finish = rng.random() < 0.4  # interrupt:false → playfinished still arrives
        if late_finish:
            confirm = c.start_play("3")
            c.wait(0.2, 1.0)
            c.play(menu_ref, pid, "playfinished")
            c.wait(2, 6)
            c.play("3", confirm, "playfinished")
        else:
            c.prompt(rng.choice(["3", menu_ref]), 2, 6)
        if rng.random() < 0.3:  # route to an agent
            self._bridge_leg(c, talk=(15, 240))
        else:
            c.wait(0.5, 10)
        c.disconnect(rng.choice(["hangup_by_api"] * 4 + ["remote_hangup", "Normal Clearing"]))
        return [c]

    def _bridge_leg(self, c: _Call, talk: tuple[float, float], fail_p: float = 0.2) -> bool:
        """bridging → bridged → … → bridge_disconnected, or a leg that fails (call stays up)."""
        rng = self.rng
        agent = self.agent()
        c.wait(0.3, 3)
        if rng.random() < 0.15:
            c.emit("bridge", {"state": "initiated", "from": self.did(), "to": agent})
        else:
            c.bridge("bridging", agent)
        if rng.random() < fail_p:
            c.wait(5, 30)
            c.bridge("failed", agent, reason=rng.choice(["User Busy", "no_answer", "Rejected"]))
            c.prompt(rng.choice(["agents_busy", "sorry_try_later"]), 2, 6)
            return False
        c.wait(3, 15)
        c.bridge("bridged", agent)
        if rng.random() < 0.35:  # DTMF only arrives once bridged (seed shape)
            for _ in range(rng.randint(1, 2)):
                c.wait(3, 20)
                digit = rng.choice(["12345", "0", "1", "9", "40021", "7"])
                body = {"state": "dtmfcollected", "digit": int(digit)}
                c.emit("dtmf", body, collected=digit, vkey=rng.choice(["voice_Id", "voice_id"]))
        c.wait(*talk)
        c.bridge("bridge_disconnected", agent)
        c.wait(0.05, 0.5)
        return True

    def inbound_bridge(self, start_ms: int) -> list[_Call]:
        """Inbound call forwarded to an agent, sometimes recorded, some legs failing."""
        rng = self.rng
        c = self.inbound("inbound_bridge", start_ms)
        self.answer(c)
        recording = rng.random() < 0.3
        if not self._bridge_leg(c, talk=(20, 300), fail_p=0.25) and rng.random() < 0.5:
            self._bridge_leg(c, talk=(20, 200), fail_p=0.3)  # retry another agent
        if recording:
            return [self._record_then_hangup(c)]
        c.disconnect(rng.choice(["Normal Clearing", "hangup_by_api", "remote_hangup"]))
        return [c]

    def speech(self, start_ms: int) -> list[_Call]:
        """ASR menu: up to three attempts; playstate shape or the seed's `state:` shape."""
        rng = self.rng
        c = self.inbound("inbound_speech", start_ms)
        self.answer(c)
        seed_shape = rng.random() < 0.5
        ref = rng.choice(["asr_menu", "welcome-prompt"])
        recognised = False
        for _ in range(3):
            result = rng.choices(["timeout", "unrecognized", "recognized"], weights=[3, 3, 5])[0]
            pid = c.start_play(ref)
            c.wait(5, 16)
            text = rng.choice(SPEECH_PHRASES) if result == "recognized" else ""
            if seed_shape:
                body: dict[str, Any] = {
                    "state": result,
                    "from": c.caller,
                    "to": c.callee,
                    "text": text,
                    "reason": {"timeout": "Timeout", "unrecognized": "Unrecognized"}.get(
                        result, rng.choice(["Recognized", "Reczognized"])
                    ),
                    "playstate": "speech_recognized",
                    "prompt_ref": ref,
                }
            else:
                ps = {"timeout": "speechtimeout", "unrecognized": "speechunrecognized"}.get(
                    result, "speechrecognized"
                )
                body = {"play_id": pid, "playstate": ps, "prompt_ref": ref}
                if result != "timeout":
                    tkey = "recognized_phrase" if rng.random() < 0.2 and text else "text"
                    body[tkey] = text
                    body["confidence"] = round(rng.uniform(0.6, 0.97) if text else 0.1, 2)
            c.emit("speech", body, speech=(result, text))
            if result == "recognized":
                recognised = True
                break
        if recognised and rng.random() < 0.3:
            c.prompt("confirm", 2, 5)
            self._bridge_leg(c, talk=(10, 120))
        else:
            c.prompt(rng.choice(["confirm", "goodbye"]), 2, 6)
            c.wait(0.3, 2)
        c.disconnect(rng.choice(["hangup_by_api", "Normal Clearing"]))
        return [c]

    def hold_transfer(self, start_ms: int) -> list[_Call]:
        """Click2Call-style: room join, hold/unhold, account number keyed, transfer, bridge."""
        rng = self.rng
        c = self.inbound("inbound_hold_transfer", start_ms)
        self.answer(c)
        c.wait(1, 4)
        c.call("joined", room_id=self.ids.hex(24))
        for _ in range(rng.randint(1, 2)):
            c.wait(20, 90)
            c.call("hold")
            c.wait(10, 60)
            c.call("unhold")
        if rng.random() < 0.7:
            c.wait(5, 30)
            digits = rng.choice(["40021#", "*123#", "0042", "7781#"])
            body = {"state": "dtmfcollected", "digits": digits}
            c.emit("dtmf", body, collected=digits, with_parties=True)
        agent = self.agent()
        c.wait(5, 30)
        c.call("transferring", transfer_to=agent, **{"from": self.did(), "to": agent})
        c.wait(3, 10)
        if rng.random() < 0.3:
            c.call("transferred", transfer_to=agent, **{"from": self.did(), "to": agent})
            c.wait(0.1, 1)
        c.bridge("bridged", agent)
        c.wait(30, 300)
        c.bridge("bridge_disconnected", agent)
        c.wait(0.1, 0.5)
        c.disconnect(rng.choice(["remote_hangup", "Normal Clearing"]))
        return [c]

    def stuck(self, start_ms: int) -> list[_Call]:
        """Inbound call answered and greeted, then its hang-up webhook never arrived: the call
        stays `connected` with no news (what the stuck_calls query is for)."""
        c = self.inbound("inbound_stuck", start_ms)
        self.answer(c)
        c.prompt(self.rng.choice(["welcome_prompt", "1"]), 2, 7)
        return [c]

    def abandoned(self, start_ms: int) -> list[_Call]:
        """Inbound caller hangs up before the app answers: never connected."""
        c = self.inbound("inbound_abandoned", start_ms)
        c.wait(1, 12)
        c.disconnect(self.rng.choice(["remote_hangup", "Normal Clearing"]))
        return [c]

    # ---- outbound
    def tts(self, start_ms: int) -> list[_Call]:
        """Outbound TTS greeting (action_on_connect), maybe a second prompt, then hang-up."""
        rng = self.rng
        c = self.outbound("outbound_tts", start_ms)
        c.wait(3, 20)
        c.call("connected")
        pid = c.start_play("1")
        if rng.random() < 0.1:  # callee hangs up mid-greeting
            c.wait(1, 4)
            c.disconnect("remote_hangup")
            return [c]
        c.wait(3, 12)
        c.play("1", pid, "playfinished")
        if rng.random() < 0.6:
            c.prompt("2", 3, 10)
        c.wait(0.5, 10)
        c.disconnect()
        return [c]

    def outbound_bridge(self, start_ms: int) -> list[_Call]:
        """Outbound greeting then connect to a third number (PUT …/connect), some legs failing."""
        rng = self.rng
        c = self.outbound("outbound_bridge", start_ms)
        c.wait(3, 15)
        c.call("connected")
        c.prompt(rng.choice(["1", "welcome_prompt"]), 3, 8)
        recording = rng.random() < 0.3
        self._bridge_leg(c, talk=(15, 200), fail_p=0.25)
        if recording:
            return [self._record_then_hangup(c)]
        c.disconnect()
        return [c]

    def recording(self, start_ms: int) -> list[_Call]:
        """Outbound call recorded from connect (recordstate or seed `state:` shape)."""
        c = self.outbound("outbound_recording", start_ms)
        c.wait(2, 12)
        c.call("connected")
        return [self._record_then_hangup(c)]

    def _record_then_hangup(self, c: _Call) -> _Call:
        """Start/stop a recording (some fail), hang up; the URL rides on `disconnected`."""
        rng = self.rng
        seed_shape = rng.random() < 0.4
        rec_id = self.ids.recording_id()
        c.wait(0.8, 2)
        if seed_shape:
            c.emit("recording", {"state": "started", "description": "Recording Started"})
        else:
            c.emit("recording", {"recordstate": "started", "recording_id": rec_id})
        began = c.t
        secs = (c.wait(10, 90) - began) // 1000
        fails = rng.random() < 0.15
        url = f"{RECORDING_BASE}/{rec_id}.{rng.choice(['mp3', 'wav'])}"
        if fails:
            if seed_shape:
                c.emit("recording", {"state": "failed", "description": "Recording Failed"})
            else:
                c.emit(
                    "recording",
                    {
                        "recordstate": "failed",
                        "recording_id": rec_id,
                        "description": "recording storage unavailable",
                    },
                )
            c.wait(1, 15)
            c.disconnect(rng.choice(["hangup_by_api", "Normal Clearing"]))
            return c
        late = rng.random() < 0.2  # the file is finalised just after the hang-up
        if not late:
            if seed_shape:
                c.emit("recording", {"state": "completed", "description": "Recording Completed"})
            else:
                c.emit(
                    "recording",
                    {
                        "recordstate": "completed",
                        "recording_id": rec_id,
                        "recording_url": url,
                        "recording_duration": secs,
                    },
                )
        c.wait(1, 15)
        c.disconnect(
            rng.choice(["hangup_by_api", "Normal Clearing"]),
            recording_url=url,
            recording_duration=secs,
            tkey="timeStamp" if seed_shape else None,
        )
        if late:
            c.wait(0.5, 3)
            c.emit(
                "recording",
                {
                    "recordstate": "completed",
                    "recording_id": rec_id,
                    "recording_url": url,
                    "recording_duration": secs,
                },
            )
        return c

    def room_join(self, start_ms: int) -> list[_Call]:
        """Outbound call joined to a video room after the greeting."""
        c = self.outbound("outbound_room_join", start_ms)
        c.wait(3, 12)
        c.call("connected")
        c.prompt("1", 3, 7)
        c.wait(1, 3)
        c.call("joined", room_id=self.ids.hex(24))
        c.wait(15, 600)
        c.disconnect(self.rng.choice(["hangup_by_api", "remote_hangup"]))
        return [c]

    def busy(self, start_ms: int) -> list[_Call]:
        """Callee busy: initiated (→ ringing) → disconnected, never connected."""
        rng = self.rng
        c = _Call(
            self, "outbound_busy", "outbound", start_ms, caller=self.did(), callee=self.customer()
        )
        c.call("initiated")
        if rng.random() < 0.4:
            c.wait(1, 3)
            c.call("ringing")
        c.wait(1, 5)
        c.disconnect(rng.choice(["User Busy", "busy"]))
        return [c]

    def no_answer(self, start_ms: int) -> list[_Call]:
        """Rings out: ends `failed` (or disconnected with a no-answer reason)."""
        rng = self.rng
        c = self.outbound("outbound_no_answer", start_ms)
        c.wait(25, 60)
        if rng.random() < 0.7:
            c.call("failed", reason=rng.choice(["no_answer", "NO_ANSWER", "Timeout"]))
        else:
            c.disconnect("No Answer")
        return [c]

    def broadcast(self, start_ms: int, legs: int) -> tuple[list[_Call], BroadcastTruth, _Ev]:
        """One broadcast: per-leg calls plus the summary (legacy resultSet or call info)."""
        rng = self.rng
        bid = self.ids.uuid()
        legacy = rng.random() < 0.5
        did = self.did()
        calls: list[_Call] = []
        outcomes: list[bool] = []
        for i in range(legs):
            c = _Call(
                self,
                "broadcast_leg",
                "outbound",
                start_ms + i * rng.randint(100, 400),
                caller=did,
                callee=self.customer(),
                broadcast_id=bid,
            )
            c.call("initiated")
            c.wait(2, 5)
            c.call("ringing")
            if rng.random() < 0.25:
                c.wait(25, 60)
                c.call("failed", reason="no_answer")
                outcomes.append(False)
            else:
                c.wait(2, 12)
                c.call("connected")
                pid = c.start_play("broadcast_initial_prompt" if not legacy else "1")
                c.wait(5, 13)
                c.play(None if legacy else "broadcast_initial_prompt", pid, "playfinished")
                if legacy and rng.random() < 0.6:
                    menu = c.start_play("2")
                    if rng.random() < 0.5:
                        c.wait(2, 6)
                        digit = rng.choice("123456789")
                        fields = self.digit_fields(digit)
                        c.play("2", menu, "digitcollected", collected=digit, **fields)
                        c.wait(0.5, 4)
                        c.disconnect("remote_hangup")
                    else:
                        c.wait(10, 16)
                        c.play("2", menu, "menutimeout")
                        c.wait(0.3, 1.5)
                        c.disconnect()
                else:
                    c.wait(0.2, 1)
                    c.disconnect()
                outcomes.append(True)
            calls.append(c)
        end = max(c.t for c in calls) + rng.randint(300, 3000)
        ok = sum(outcomes)
        summary: dict[str, Any] = {"broadcast_id": bid}
        if legacy:
            state = "broadcastcomplete"
            summary.update(
                state=state,
                resultSet={"successfull_calls": ok, "failed_calls": legs - ok},
                **{"from": did},
            )
        else:
            state = "broadcastcall_complete"
            summary.update(
                state=state,
                **{"from": did},
                broadcast_call_info=[
                    {
                        "voice_id": c.voice_id,
                        "to": c.callee,
                        "state": "completed" if good else "failed",
                    }
                    for c, good in zip(calls, outcomes, strict=True)
                ],
            )
        truth = BroadcastTruth(bid, state, ok, legs - ok, [c.voice_id for c in calls])
        return calls, truth, _Ev(end, summary, "timestamp", "z")


# Weights of the everyday mix (a broadcast counts its legs as calls).
MIX: dict[str, int] = {
    "inbound_ivr": 20,
    "outbound_tts": 14,
    "inbound_bridge": 10,
    "outbound_bridge": 9,
    "inbound_speech": 10,
    "outbound_recording": 8,
    "outbound_room_join": 4,
    "inbound_hold_transfer": 5,
    "outbound_busy": 5,
    "outbound_no_answer": 5,
    "inbound_abandoned": 3,
    "broadcast": 4,
}


def _scenario_fn(gen: _Gen, name: str) -> Callable[[int], list[_Call]]:
    return {
        "inbound_ivr": gen.ivr,
        "outbound_tts": gen.tts,
        "inbound_bridge": gen.inbound_bridge,
        "outbound_bridge": gen.outbound_bridge,
        "inbound_speech": gen.speech,
        "outbound_recording": gen.recording,
        "outbound_room_join": gen.room_join,
        "inbound_hold_transfer": gen.hold_transfer,
        "outbound_busy": gen.busy,
        "outbound_no_answer": gen.no_answer,
        "inbound_abandoned": gen.abandoned,
        "inbound_stuck": gen.stuck,
    }[name]


# `callgate up --demo`: more calls nobody answers than the everyday mix (outbound ASR of a
# real campaign is nearer 60 % than 90 %), and a few calls whose hang-up never arrived.
DEMO_MIX: dict[str, int] = {
    **MIX,
    "outbound_busy": 10,
    "outbound_no_answer": 14,
    "inbound_abandoned": 6,
    "inbound_stuck": 1,
}

# When demo calls start (UTC hours; weekdays Monday first): busiest 09:00-17:00, tailing
# off in the evening, a trickle at night; Saturday about a third of a weekday, Sunday a fifth.
HOURLY_WEIGHTS: tuple[float, ...] = (
    1, 1, 1, 1, 1, 2, 4, 8, 14, 20, 22, 21, 18, 20, 21, 20, 17, 12, 8, 6, 4, 3, 2, 1,
)  # fmt: skip
WEEKDAY_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 0.95, 0.35, 0.2)
_HOUR_MS = 3_600_000


def spread_starts(
    calls: int,
    start: datetime,
    end: datetime,
    *,
    seed: int,
    hourly: tuple[float, ...] = HOURLY_WEIGHTS,
    weekday: tuple[float, ...] = WEEKDAY_WEIGHTS,
) -> list[int]:
    """Start offsets (ms after `start`, sorted) of `calls` calls between `start` and `end`:
    shared out per UTC day by its weekday's weight times the hours it has in the window,
    ±15 % (every day gets at least one call when there are enough calls), then placed in an hour
    by the hourly weights, at a uniform moment within it. Pure and seeded."""
    if calls < 0 or len(hourly) != 24 or len(weekday) != 7:
        raise ValueError("calls must be >= 0, with 24 hourly and 7 weekday weights")
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    span_ms = int((end - start).total_seconds() * 1000)
    if calls == 0 or span_ms <= 0:
        return [] if calls == 0 else [0] * calls
    rng = random.Random(seed)
    # (day, offset of the hour's first ms, usable ms in it, weight), hour by hour
    hours: list[tuple[str, int, int, float]] = []
    at = start.replace(minute=0, second=0, microsecond=0)
    while at < end:
        lo = max(0, int((at - start).total_seconds() * 1000))
        hi = min(span_ms, int((at - start).total_seconds() * 1000) + _HOUR_MS)
        if hi > lo:
            weight = weekday[at.weekday()] * hourly[at.hour] * (hi - lo) / _HOUR_MS
            hours.append((at.date().isoformat(), lo, hi - lo, weight))
        at += timedelta(hours=1)
    days: dict[str, list[tuple[str, int, int, float]]] = {}
    for hour in hours:
        days.setdefault(hour[0], []).append(hour)
    floor = 1 if calls >= len(days) else 0
    # Days differ a little beyond their weekday (±15 %), as real ones do.
    weights = {
        day: sum(h[3] for h in day_hours) * rng.uniform(0.85, 1.15)
        for day, day_hours in days.items()
    }
    total = sum(weights.values()) or 1.0
    spare = calls - floor * len(days)
    shares = {day: spare * w / total for day, w in weights.items()}
    counts = {day: floor + int(share) for day, share in shares.items()}
    by_remainder = sorted(days, key=lambda d: (shares[d] - int(shares[d]), d), reverse=True)
    for day in by_remainder[: calls - sum(counts.values())]:
        counts[day] += 1
    offsets: list[int] = []
    for day, day_hours in days.items():
        picked = rng.choices(day_hours, weights=[h[3] for h in day_hours], k=counts[day])
        offsets.extend(lo + rng.randrange(usable) for _, lo, usable, _ in picked)
    return sorted(offsets)


def generate(
    calls: int,
    *,
    seed: int,
    start: datetime,
    arrival_gap_s: float = 3.0,
    duplicates: float = 0.0,
    reorder: float = 0.0,
    owner_ref: str = "callgate-sim",
    mix: dict[str, int] | None = None,
    starts_ms: Sequence[int] | None = None,
) -> Simulation:
    """Generate exactly `calls` calls (broadcast legs included) and their deliveries.

    `start` is floored to the minute (so the docs' minute-only timestamps can be exact);
    call starts follow a Poisson process with mean gap `arrival_gap_s` (event time), or,
    with `starts_ms` (one sorted offset from `start` per call, e.g. from `spread_starts`),
    start there (a broadcast's legs take the offsets of as many calls).
    `duplicates`: chance that an event is delivered a second time, identical, a few
    seconds later. `reorder`: chance that an event swaps sending order with the call's
    next one (timestamps unchanged).
    """
    if calls < 0:
        raise ValueError("calls must be >= 0")
    if starts_ms is not None and len(starts_ms) != calls:
        raise ValueError("starts_ms needs one offset per call")
    for name, p in (("duplicates", duplicates), ("reorder", reorder)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1")
    rng = random.Random(seed)
    start = start.astimezone(UTC).replace(second=0, microsecond=0)
    gen = _Gen(rng, owner_ref)
    weights = mix or MIX
    names = list(weights)
    built: list[_Call] = []
    summaries: list[_Ev] = []
    broadcasts: list[BroadcastTruth] = []
    t = 0.0
    while len(built) < calls:
        start_ms = int(t * 1000) if starts_ms is None else starts_ms[len(built)]
        name = rng.choices(names, weights=[weights[n] for n in names])[0]
        if name == "broadcast":
            legs = min(rng.randint(2, 6), calls - len(built))
            if legs < 2:
                name = "outbound_tts"
            else:
                legs_built, truth, summary = gen.broadcast(start_ms, legs)
                built.extend(legs_built)
                broadcasts.append(truth)
                summaries.append(summary)
        if name != "broadcast":
            built.extend(_scenario_fn(gen, name)(start_ms))
        t += rng.expovariate(1.0 / arrival_gap_s) if arrival_gap_s > 0 else 0.0

    # Per-call sending schedule: maybe swap neighbours, maybe redeliver.
    pending: list[Delivery] = []
    index = 0
    streams: list[list[_Ev]] = [c.events for c in built] + [[s] for s in summaries]
    owners: list[str | None] = [c.voice_id for c in built] + [None] * len(summaries)
    for evs, vid in zip(streams, owners, strict=True):
        # An event is sent when it happens; a "reordered" one is held back until just
        # after the call's next event (never sent before it happened).
        slots = [e.at_ms for e in evs]
        i = 0
        while i < len(slots) - 1:
            if rng.random() < reorder:
                slots[i] = slots[i + 1] + rng.randint(1, 400)
                i += 2
            else:
                i += 1
        for slot, ev in zip(slots, evs, strict=True):
            payload = _render(ev, start)
            pending.append(Delivery(slot, vid, payload, False, index))
            if rng.random() < duplicates:
                later = slot + rng.randint(500, 8000)
                pending.append(Delivery(later, vid, payload, True, index))
            index += 1
    pending.sort(key=lambda d: (d.send_ms, d.index, d.redelivery))
    return Simulation(
        seed=seed,
        start=start,
        deliveries=pending,
        calls=[c.truth() for c in built],
        broadcasts=broadcasts,
    )


def _render(ev: _Ev, start: datetime) -> dict[str, Any]:
    """The raw event as EnableX would send it, with its timestamp written in."""
    payload = dict(ev.payload)
    at = start + timedelta(milliseconds=ev.at_ms)
    payload[ev.tkey] = format_time(at, ev.style)
    return payload
