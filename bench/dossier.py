"""The breach dossier's cost: HTML and PDF of a synthetic breach report, by number of patients.

``apptgate audit breach-report --format html|pdf`` reads the report from the
database, then renders it with two pure functions: the page
(``service.disclosure.breach_dossier.render``) and its PDF
(``service.disclosure.pdf.render``, WeasyPrint). This calls those same two
functions on a synthetic :class:`service.disclosure.breach.Report` of ``N``
patients, so no database is needed and only the rendering is timed:

* the report: a partner, one key, a window of 30 days; 1 + a geometric number
  of appointments per patient (mean about 2.5, at most 12) with one of
  ``max(40, N / 40)`` practitioners in 24 specialties; every patient reached in
  the basic view, one in six also in the contact view with one to four contact
  fields; hourly activity over the window; with ``--contact``, a name and
  email per patient (the ``--include-contact`` columns);
* each size in a fresh process (``--child``), so that its peak RSS is its own:
  wall and CPU time of the HTML and of the PDF, the PDF's pages
  (``pdfinfo``), bytes and the process's peak RSS;
* a check that the PDF is whole: with poppler's ``pdftotext`` on PATH, the
  first and last patients' ids and the last page's footer must be in its text.

Writes ``bench/results/<date>-dossier.json`` and prints a table. Growth is
read from the last column: seconds of PDF per 1,000 patients, flat when the
cost is linear.

    .venv/bin/python bench/dossier.py [--sizes 1000,6128,20000] [--rounds 1] [--contact]
                                      [--keep DIR] [--profile DIR]

``--profile DIR`` records each size's child under py-spy (``.venv/bin/py-spy``)
into ``DIR/dossier-<N>.svg``, a flame graph.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from service import models  # noqa: E402
from service.disclosure import breach, breach_dossier, pdf  # noqa: E402

SPECIALTIES = (
    "Cardiology", "Dermatology", "Endocrinology", "Gastroenterology", "General practice", "Gynaecology",
    "Haematology", "Nephrology", "Neurology", "Obstetrics", "Oncology", "Ophthalmology", "Orthopaedics",
    "Otorhinolaryngology", "Paediatrics", "Physiotherapy", "Psychiatry", "Pulmonology", "Radiology",
    "Rheumatology", "Sexual health", "Sports medicine", "Urology", "Dentistry",
)  # fmt: skip
START = datetime(2020, 9, 1, tzinfo=UTC)
DAYS = 30
KEY = "pk_benchdossier000001"


def synthetic_report(patients: int, *, seed: int = 2020, contact: bool = False) -> breach.Report:
    """A breach report of ``patients`` patients, the same for the same arguments."""
    rng = random.Random(seed)
    practitioners = [
        (uuid.UUID(int=rng.getrandbits(128)), f"Dr Benchdossier-{n:04d} Practitioner", specialty)
        for n, specialty in zip(range(max(40, patients // 40)), itertools.cycle(SPECIALTIES), strict=False)
    ]
    end = START + timedelta(days=DAYS)
    reported = []
    activity: dict[tuple[datetime, models.View], int] = {}
    views_found = {models.View.BASIC: [0, 0, 0], models.View.CONTACT: [0, 0, 0]}
    for n in range(patients):
        patient_id = uuid.UUID(int=rng.getrandbits(128))
        count = 1
        while count < 12 and rng.random() < 0.6:
            count += 1
        appointments = []
        for _ in range(count):
            who, name, specialty = rng.choice(practitioners)
            start = START + timedelta(days=rng.randrange(DAYS + 30), minutes=15 * rng.randrange(8 * 4, 19 * 4))
            appointments.append(
                models.AppointmentSummary(uuid.UUID(int=rng.getrandbits(128)), patient_id, start, who, name, specialty)
            )
        appointments.sort(key=lambda a: a.start_time)
        seen = sorted(START + timedelta(seconds=rng.randrange(DAYS * 86400)) for _ in range(rng.randint(1, 6)))
        views: tuple[models.View, ...] = (models.View.BASIC,)
        fields: tuple[int, ...] = ()
        if rng.random() < 1 / 6:
            views = (models.View.BASIC, models.View.CONTACT)
            fields = tuple(sorted(rng.sample(list(models.ContactField), rng.randint(1, 4))))
        for at in seen:
            hour = at.replace(minute=0, second=0, microsecond=0)
            for view in views:
                activity[(hour, view)] = activity.get((hour, view), 0) + count
        for view in views:
            views_found[view][0] += 1
            views_found[view][1] += count
            views_found[view][2] += count * len(seen)
        affected = models.AffectedPatient(
            patient_id, tuple(a.id for a in appointments), fields, seen[0], seen[-1], 0, views
        )
        notice = (
            models.NoticeContact(f"Benchgiven{n:05d}", f"BENCHFAMILY-{n:05d}", f"bench.dossier.{n:05d}@example.invalid")
            if contact
            else None
        )
        reported.append(breach.ReportedPatient(affected, tuple(appointments), notice))
    return breach.Report(
        partner=models.Partner(uuid.UUID(int=2020), "Benchdossier Agenda", START - timedelta(days=400)),
        key_id=KEY,
        key_ids=(KEY,),
        start_time=START,
        end_time=end,
        generate_time=end + timedelta(days=1),
        patients=tuple(reported),
        activity=tuple(breach.Activity(h, v, c) for (h, v), c in sorted(activity.items())),
        views=breach.view_totals({v: (p, a, d) for v, (p, a, d) in views_found.items()}),
        verification=breach.Verification(breach.VerificationState.INTACT, end, 10**6, 10**6, 10**6, 12, 10**5, 0),
        revoked_keys=((KEY, end + timedelta(hours=3)),),
    )


def _pages(path: Path) -> int | None:
    """The PDF's pages by poppler's ``pdfinfo``; None without it."""
    if not shutil.which("pdfinfo"):
        return None
    done = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True)
    found = re.search(r"^Pages:\s+(\d+)", done.stdout, flags=re.M)
    return int(found.group(1)) if found else None


def _whole(path: Path, report: breach.Report, pages: int | None) -> bool | None:
    """Whether the PDF's text has the first and last patients and the last page's footer; None without poppler."""
    if pages is None or not shutil.which("pdftotext"):
        return None
    text = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True, check=True).stdout
    ids = [str(p.affected.patient_id) for p in (report.patients[0], report.patients[-1])]
    # pdftotext joins a word hyphenated at a line's end and drops the hyphen: compare without any.
    flat = re.sub(r"[\s-]+", "", text)
    return all(i.replace("-", "") in flat for i in ids) and f"{pages}/{pages}" in flat


@dataclass
class Figures:
    """One size rendered once."""

    patients: int
    appointments: int
    html_s: float
    html_cpu_s: float
    html_bytes: int
    pdf_s: float
    pdf_cpu_s: float
    pdf_bytes: int
    pages: int | None
    #: Whether the PDF's text has the first and last patients and the last page's number; None without poppler.
    whole: bool | None
    peak_rss_mib: float
    round: int = 0


def child(patients: int, contact: bool, keep: Path | None) -> Figures:
    """Render one size in this process."""
    report = synthetic_report(patients, contact=contact)
    wall, cpu = time.perf_counter(), time.process_time()
    html = breach_dossier.render(report, dpo_contact="DPO Benchdossier <dpo.bench@example.invalid>")
    html_wall, html_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    data = pdf.render(html)
    pdf_wall, pdf_cpu = time.perf_counter() - wall, time.process_time() - cpu
    with tempfile.TemporaryDirectory() as scratch:
        where = keep or Path(scratch)
        where.mkdir(parents=True, exist_ok=True)
        path = where / f"dossier-{patients}.pdf"
        path.write_bytes(data)
        if keep:
            (where / f"dossier-{patients}.html").write_text(html)
        pages = _pages(path)
        whole = _whole(path, report, pages)
    return Figures(
        patients=patients,
        appointments=sum(len(p.appointments) for p in report.patients),
        html_s=html_wall,
        html_cpu_s=html_cpu,
        html_bytes=len(html.encode()),
        pdf_s=pdf_wall,
        pdf_cpu_s=pdf_cpu,
        pdf_bytes=len(data),
        pages=pages,
        whole=whole,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _run_child(patients: int, args: argparse.Namespace) -> Figures:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(patients)]
    if args.contact:
        command.append("--contact")
    if args.keep:
        command += ["--keep", str(args.keep)]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).with_name("py-spy")
        command = [str(spy), "record", "--rate", "50", "--output", str(args.profile / f"dossier-{patients}.svg"),
                   "--", *command]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"dossier bench: {patients} patients failed:\n{done.stderr}")
    # py-spy writes its own lines to stdout as well: the figures are the child's JSON line.
    [line] = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return Figures(**json.loads(line))


def _table(results: list[Figures]) -> str:
    lines = [
        "| patients | appointments | HTML s | HTML MB | PDF s (CPU s) | pages | PDF MB | peak RSS MiB | whole "
        "| PDF CPU s per 1k patients |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: |",
    ]
    for r in results:
        whole = {True: "yes", False: "NO", None: "–"}[r.whole]
        lines.append(
            f"| {r.patients:,} | {r.appointments:,} | {r.html_s:.2f} | {r.html_bytes / 1e6:.1f} | "
            f"{r.pdf_s:.1f} ({r.pdf_cpu_s:.1f}) | {r.pages if r.pages is not None else '–'} | "
            f"{r.pdf_bytes / 1e6:.1f} | {r.peak_rss_mib:,.0f} | {whole} | {r.pdf_cpu_s / r.patients * 1000:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,6128,20000", help="patients per report, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="render every size this many times (fresh processes)")
    parser.add_argument("--contact", action="store_true", help="with names and emails (--include-contact)")
    parser.add_argument("--keep", type=Path, help="write each size's HTML and PDF to this folder")
    parser.add_argument("--profile", type=Path, help="record each size under py-spy into this folder (flame graphs)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(asdict(child(args.child, args.contact, args.keep))))
        return 0
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    started = datetime.now(UTC)
    load = os.getloadavg()[0]
    results = []
    for round_ in range(args.rounds):
        for patients in sizes:
            result = replace(_run_child(patients, args), round=round_)
            results.append(result)
            print(f"{patients:,} patients: HTML {result.html_s:.2f} s, PDF {result.pdf_s:.1f} s "
                  f"({result.pdf_cpu_s:.1f} s CPU), {result.pages} pages", file=sys.stderr, flush=True)  # fmt: skip
    commit = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    print(f"{started:%Y-%m-%d %H:%M} UTC, {commit}, load {load:.1f} at the start, {os.cpu_count()} CPUs, "
          f"contact columns {'on' if args.contact else 'off'}")  # fmt: skip
    print(_table(results))
    out = BENCH_DIR / "results" / f"{started:%Y-%m-%d-%H%M}-dossier.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"start": started.isoformat(), "commit": commit, "load_1m": load, "contact": args.contact}
    out.write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2))
    print(f"written {out.relative_to(BENCH_DIR.parent)}", file=sys.stderr)
    return 0 if all(r.whole is not False for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
