"""The developer's commands of ``broker``: jobs, offers, the market, invoices, over HTTP.

They talk to a broker at ``--broker`` (``BROKER_URL``) with the key in
``BROKER_API_KEY`` or ``--api-key-file``, never on the command line. They need only
the client's dependencies (the SDK, httpx, typer), never the server's. Every
refusal is one line, ``error: ...``, exit status 1 (2 for a bad command line);
``--debug`` shows the traceback instead. ``--json`` prints what the API answered.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

jobs_app = typer.Typer(
    help="Your jobs (developers): submit a JAX function, list, show, cancel, logs.",
    no_args_is_help=True,
)
offers_app = typer.Typer(help="Offers on the market (asks).", no_args_is_help=True)
market_app = typer.Typer(help="The market: order books by accelerator model.", no_args_is_help=True)

BrokerUrl = Annotated[
    str, typer.Option("--broker", envvar="BROKER_URL", help="The broker's URL [BROKER_URL]")
]
KeyFile = Annotated[
    Path | None,
    typer.Option(
        envvar="BROKER_API_KEY_FILE",
        help="A file holding your API key, readable by you only (chmod 600); or set BROKER_API_KEY",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer")]
Debug = Annotated[bool, typer.Option(help="Show the traceback of an error")]
DEFAULT_URL = "http://127.0.0.1:8000"


class UserError(Exception):
    """A mistake on the command line or in the files it names: one line, exit 2."""


def api_key(from_env: str, path: Path | None) -> str:
    """The API key: BROKER_API_KEY, or the file ``path``, which only its owner may read
    or write (a key anyone on the machine can read is as good as leaked)."""
    import stat

    if from_env and path is not None:
        raise ValueError("give the key one way: BROKER_API_KEY or --api-key-file, not both")
    if path is None:
        if not from_env.strip():
            raise ValueError("give an API key: set BROKER_API_KEY or --api-key-file")
        return from_env.strip()
    try:
        info = path.stat()
    except OSError as exc:
        raise ValueError(f"cannot read the key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"the key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ValueError(
            f"the key file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}): "
            f"chmod 600 {path}"
        )
    if info.st_uid != os.getuid():
        raise ValueError(f"the key file {path} belongs to another user")
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"the key file {path} is empty")
    return key


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn what a user can fix into one line on stderr; tracebacks only with --debug."""
    from broker.sdk.http import BrokerError

    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except UserError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except BrokerError as exc:
        if debug:
            raise
        typer.echo(f"error: {_broker_error(exc)}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:
        if debug:
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc} (--debug shows the traceback)", err=True)
        raise typer.Exit(1) from None


def _broker_error(exc: Any) -> str:
    if exc.status == 401:
        return f"the broker refused the API key ({exc.message}): check BROKER_API_KEY"
    if exc.status == 0:
        return f"{exc.message} (is the broker running at BROKER_URL?)"
    where = f" [{exc.field}]" if exc.field else ""
    return f"{exc.message}{where}"


def _client(url: str, key_file: Path | None) -> Any:
    from broker.sdk import Client

    try:
        key = api_key(os.environ.get("BROKER_API_KEY", ""), key_file)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return Client(url.rstrip("/"), key, retries=2)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# ---- the program and its arguments ---------------------------------------------------


def load_function(target: str) -> Callable[..., Any]:
    """``path/to/file.py:function`` -> that function (the file is run as a module)."""
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name:
        raise UserError(f"give the program as FILE.py:function, not {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"no file {path}")
    spec = importlib.util.spec_from_file_location(f"broker_job_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # its own imports, beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{path} has no function {name!r}")
    return fn  # type: ignore[no-any-return]


def parse_args(text: str | None, base: Path | None = None) -> list[Any]:
    """``--args``: a JSON list, one item per argument of the function. Numbers and
    (nested) lists become arrays (float32 if any number has a fraction, else int32),
    objects become dicts of arrays, and "@file.npy" loads an array."""
    if text is None:
        return []
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--args is not JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(values, list):
        raise UserError("--args must be a JSON list: one item per argument, e.g. '[[1, 2], 3.5]'")
    return [_array(v, f"argument {i + 1}", base) for i, v in enumerate(values)]


def _array(value: Any, where: str, base: Path | None) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _array(v, f"{where}.{k}", base) for k, v in value.items()}
    if isinstance(value, str):
        if not value.startswith("@"):
            raise UserError(f"{where}: a string must be @file.npy (an array saved by numpy)")
        path = Path(value[1:])
        path = path if path.is_absolute() or base is None else base / path
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{where}: cannot load {path}: {exc}") from None
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise UserError(f"{where}: not a rectangular array: {exc}") from None
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind in "iub":
        return array.astype(np.int32) if array.dtype.kind != "b" else array
    raise UserError(f"{where}: numbers, lists of numbers or @file.npy, not {value!r}")


# ---- jobs ------------------------------------------------------------------------------


@jobs_app.command("submit")
def jobs_submit(
    target: Annotated[str, typer.Argument(metavar="FILE.py:FUNCTION", help="The JAX function")],
    args: Annotated[
        str | None,
        typer.Option(
            "--args",
            help="Its arguments as a JSON list, e.g. '[[1.0, 2.0], [[3.0], [4.0]]]'; "
            '"@x.npy" loads an array from a file',
        ),
    ] = None,
    max_price: Annotated[
        float, typer.Option(min=0, help="The most you pay, USD per accelerator-hour")
    ] = ...,  # type: ignore[assignment]
    platform: Annotated[
        list[str] | None,
        typer.Option(help="A backend it may run on (cuda, rocm, tpu, cpu); repeat [all]"),
    ] = None,
    accelerators: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Accelerators, all on one offer; under 1 a part of one (0.25: a quarter of "
            "its compute and memory)",
        ),
    ] = 1,
    mig_profile: Annotated[
        str | None, typer.Option(help="A MIG instance of this profile (e.g. 3g.40gb)")
    ] = None,
    accepts_shared: Annotated[
        bool,
        typer.Option(
            help="A part of one may run on a shared accelerator (time-sliced, compute not isolated)"
        ),
    ] = False,
    min_memory_gib: Annotated[float, typer.Option(min=0, help="Memory per accelerator")] = 0,
    model: Annotated[
        list[str] | None, typer.Option(help="An accelerator model it may use; repeat [any]")
    ] = None,
    country: Annotated[
        list[str] | None, typer.Option(help="A country its data may go to; repeat [any]")
    ] = None,
    deadline_hours: Annotated[float | None, typer.Option(help="Finish within this")] = None,
    budget: Annotated[
        float | None, typer.Option(help="The most it may cost, USD, fee included")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Iterative: run state = FUNCTION(state, *rest) this many times, the first "
            "argument being the state"
        ),
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Iterative: save every N")] = None,
    name: Annotated[str | None, typer.Option(help="A name to know it by")] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait for the job to end and print its result")
    ] = False,
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Package a JAX function for every backend, upload it and its arguments, and bid.
    Prints the job's id (last line), or with --wait its result."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # packaging needs no accelerator
    with _errors(debug):
        fn = load_function(target)
        inputs = parse_args(args, Path.cwd())
        fields: dict[str, Any] = {
            "max_price_per_hour": max_price,
            "accelerators": int(accelerators) if accelerators.is_integer() else accelerators,
            "mig_profile": mig_profile,
            "accepts_shared": accepts_shared or None,
            "min_memory_gib": min_memory_gib,
            "accelerator_models": model or None,
            "allowed_countries": [c.upper() for c in country] if country else None,
            "deadline_hours": deadline_hours,
            "budget_usd": budget,
            "name": name or target.rpartition(":")[2],
            "idempotency_key": str(uuid.uuid4()),
        }
        options: dict[str, Any] = {"steps": steps, "checkpoint_every": checkpoint_every}
        if platform:
            options["platforms"] = tuple(platform)
        if steps is not None and not inputs:
            raise UserError("an iterative job (--steps) needs its state as the first argument")
        with _client(broker, api_key_file) as client:
            job = client.submit(fn, *inputs, **options, **fields)
            typer.echo(f"submitted {job.id} ({job.state})", err=True)
            if wait:
                job.wait(progress=not as_json)
                result = job.result()
                if as_json:
                    _print_json({**job.data, "output": _plain(result)})
                else:
                    typer.echo(_plain(result))
                return
            if as_json:
                _print_json(job.data)
            else:
                typer.echo(job.id)


def _plain(value: Any) -> Any:
    """Arrays as nested lists, for printing."""
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(x).tolist(), value)


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Your jobs, newest first."""
    with _errors(debug), _client(broker, api_key_file) as client:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        page = client.http.json("GET", "/v1/jobs", params=params)
        if as_json:
            _print_json(page)
            return
        rows = [
            (
                j["id"],
                j["name"],
                j["state"],
                j["accelerators"],
                f"${j['max_price_per_hour']}/h",
                f"${j['price_per_hour']}/h" if j["price_per_hour"] else None,
                f"${j['cost_usd']}",
                f"{j['created_at']:.19}",
            )
            for j in page["items"]
        ]
        headers = ("id", "name", "state", "acc", "bid", "matched at", "cost", "created")
        _table(headers, rows)
        typer.echo(f"{len(rows)} of {page['total']} jobs", err=True)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="The job's id (job_...)")],
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """One job: its state, where it runs, its estimate and cost, why it waits."""
    with _errors(debug), _client(broker, api_key_file) as client:
        job = client.http.json("GET", f"/v1/jobs/{job_id}")
        runs = client.http.json("GET", f"/v1/jobs/{job_id}/runs")
        if as_json:
            _print_json({**job, "runs": runs})
            return
        facts = [
            ("job", f"{job['id']} {job['name'] or ''}".rstrip()),
            ("state", job["state"]),
            ("bid", f"${job['max_price_per_hour']}/h x {job['accelerators']} accelerators"),
            ("platforms", ", ".join(job["platforms"])),
            ("steps", f"{job['steps_done']}/{job['steps']}" if job["steps"] else None),
            ("attempts", job["attempts"]),
            ("cost so far", f"${job['cost_usd']} ({job['accelerator_seconds']:.1f} acc-s)"),
            ("error", job["error"]),
        ]
        allocation = job.get("allocation")
        if allocation:
            facts.append(
                (
                    "matched",
                    f"at ${allocation['price_per_hour']}/h, estimated "
                    f"{allocation['runtime_hours'] * 3600:.0f} s and "
                    f"${allocation['estimated_cost']['total']}",
                )
            )
        if runs:
            last = runs[-1]
            what = last["accelerator"] if last.get("slice") is None else last["held"]
            where = f"{what} in {last['region']} ({last['country']})"
            node = f" on node {last['node']}" if last["node"] else ""
            facts.append(("runs on", where + node + (", emulated" if last["emulated"] else "")))
        if job.get("unmatched"):
            facts.append(("waiting", job["unmatched"]["summary"]))
        width = max(len(k) for k, _ in facts)
        for key, value in facts:
            if value not in (None, ""):
                typer.echo(f"{key.ljust(width)}  {value}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id (job_...)")],
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Cancel a job: an open bid leaves the book, a running job is stopped."""
    with _errors(debug), _client(broker, api_key_file) as client:
        job = client.http.json("POST", f"/v1/jobs/{job_id}/cancel")
        if as_json:
            _print_json(job)
        else:
            typer.echo(f"{job['id']} {job['state']}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="The job's id (job_...)")],
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """What happened to a job, run by run: where each ran, its log (the agent's lines and
    the program's stderr), and how and why it ended (the agents' errors included)."""
    with _errors(debug), _client(broker, api_key_file) as client:
        job = client.http.json("GET", f"/v1/jobs/{job_id}")
        runs = client.http.json("GET", f"/v1/jobs/{job_id}/runs")
        lines = client.http.json("GET", f"/v1/jobs/{job_id}/logs")
        if as_json:
            _print_json({"runs": runs, "log": lines})
            return
        by_run: dict[str, list[dict[str, Any]]] = {}
        for line in lines:
            by_run.setdefault(line["allocation_id"], []).append(line)
        typer.echo(f"{job['created_at']:.19}  submitted {job['id']}")
        for run in runs:
            held = run.get("held") or f"{run['accelerators']} x {run['accelerator']}"
            where = f"{held} in {run['region']}"
            node = f" (node {run['node']})" if run["node"] else ""
            typer.echo(
                f"{run['created_at']:.19}  matched to {where}{node} at ${run['price_per_hour']}/h"
            )
            if run["started_at"]:
                typer.echo(f"{run['started_at']:.19}  started")
            for line in by_run.get(run["allocation_id"], []):
                who = "  | " if line["stream"] == "program" else "    "
                typer.echo(f"{line['at']:.19}  {who}{line['text']}")
            if run["ended_at"]:
                reason = f": {run['end_reason']}" if run["end_reason"] else ""
                used = f", {run['accelerator_seconds']:.1f} accelerator-seconds"
                typer.echo(f"{run['ended_at']:.19}  {run['status']}{used}{reason}")
        if job["finished_at"]:
            error = f": {job['error']}" if job["error"] else ""
            typer.echo(f"{job['finished_at']:.19}  {job['state']}{error}")
        else:
            typer.echo(f"now                  {job['state']}")


# ---- offers and the market -----------------------------------------------------------


@offers_app.command("list")
def offers_list(
    accelerator: Annotated[str | None, typer.Option(help="Only this model")] = None,
    region: Annotated[str | None, typer.Option(help="Only this region")] = None,
    mine: Annotated[bool, typer.Option(help="Only my offers (providers)")] = False,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Active offers, cheapest first."""
    with _errors(debug), _client(broker, api_key_file) as client:
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("accelerator", accelerator), ("region", region)):
            if value:
                params[key] = value
        if mine:
            params["mine"] = "true"
        page = client.http.json("GET", "/v1/offers", params=params)
        if as_json:
            _print_json(page)
            return
        rows = [
            (
                o["id"],
                o["accelerator"] + (" (emulated)" if o["emulated"] else ""),
                f"{o['count']}/{o['capacity']}",
                f"{o['memory_gib']:.4g} GiB",
                f"${o['price_per_hour']}/h",
                f"{o['region']} ({o['country']})",
            )
            for o in page["items"]
        ]
        _table(("id", "model", "free", "memory", "ask", "where"), rows)
        typer.echo(f"{len(rows)} of {page['total']} offers", err=True)


@market_app.command("book")
def market_book(
    accelerator: Annotated[str | None, typer.Option(help="Only this model's book")] = None,
    depth: Annotated[int, typer.Option(min=1, max=1000, help="Price levels per side")] = 5,
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Each model's best bid and ask, and its price levels."""
    with _errors(debug), _client(broker, api_key_file) as client:
        params: dict[str, Any] = {"depth": depth}
        if accelerator:
            params["accelerator"] = accelerator
        book = client.http.json("GET", "/v1/market/book", params=params)
        if as_json:
            _print_json(book)
            return
        rows = []
        for b in book["books"]:
            crossed = b["spread"] is None and b["best_bid"] and b["best_ask"]
            spread = "crossed" if crossed else (f"${b['spread']}" if b["spread"] else None)
            rows.append(
                (
                    b["accelerator"],
                    f"${b['best_bid']}/h" if b["best_bid"] else None,
                    f"${b['best_ask']}/h" if b["best_ask"] else None,
                    spread,
                    sum(level["quantity"] for level in b["bids"]),
                    sum(level["quantity"] for level in b["asks"]),
                    sum(level["quantity"] for level in b.get("unfillable", [])) or None,
                )
            )
        headers = ("model", "best bid", "best ask", "spread", "bid qty", "ask qty", "unfillable")
        _table(headers, rows)


@market_app.command("estimates")
def market_estimates(
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """How runtime estimates held per accelerator model: metered over estimated time of
    its latest runs, and the correction and start-up clearing applies."""
    with _errors(debug), _client(broker, api_key_file) as client:
        bands = client.http.json("GET", "/v1/market/estimates")
        if as_json:
            _print_json(bands)
            return
        rows = [
            (
                b["model"],
                b["runs"],
                f"{b['median']:.2f}",
                f"{b['low']:.2f}-{b['high']:.2f}",
                f"{b['correction']:.2f}",
                f"{b['startup_s']:.1f} s",
            )
            for b in bands
        ]
        headers = ("model", "runs", "metered/est", "10-90 %", "correction", "start-up")
        _table(headers, rows)
        if not rows:
            typer.echo("(no finished runs of programs yet)")


# ---- invoices (added to `broker invoices` by broker.cli) -------------------------------


def invoices_list(
    status: Annotated[str | None, typer.Option(help="Only invoices in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """Your invoices, newest first (over HTTP, with your key)."""
    with _errors(debug), _client(broker, api_key_file) as client:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        page = client.http.json("GET", "/v1/invoices", params=params)
        if as_json:
            _print_json(page)
            return
        rows = [
            (
                i["id"],
                i["status"],
                f"{i['period_start']:.10}",
                i["line_count"],
                f"${i['subtotal']}",
                f"${i['fee']}",
                f"${i['total']}",
            )
            for i in page["items"]
        ]
        _table(("id", "status", "period", "lines", "subtotal", "fee", "total"), rows)


def invoices_show(
    invoice_id: Annotated[str, typer.Argument(help="The invoice's id (inv_...)")],
    broker: BrokerUrl = DEFAULT_URL,
    api_key_file: KeyFile = None,
    as_json: AsJson = False,
    debug: Debug = False,
) -> None:
    """One invoice: a line per run, the fee and the total."""
    with _errors(debug), _client(broker, api_key_file) as client:
        invoice = client.http.json("GET", f"/v1/invoices/{invoice_id}")
        if as_json:
            _print_json(invoice)
            return
        typer.echo(f"{invoice['id']}  {invoice['status']}  from {invoice['period_start']:.10}")
        rows = [
            (
                line.get("job_id"),
                f"{line['accelerator_hours']}" if "accelerator_hours" in line else None,
                f"${line['rate_per_hour']}/h",
                f"${line['amount']}",
            )
            for line in invoice["lines"]
        ]
        _table(("job", "acc-hours", "rate", "amount"), rows)
        typer.echo(
            f"subtotal ${invoice['subtotal']}  fee ${invoice['fee']}  total ${invoice['total']}"
        )
