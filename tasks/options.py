"""Options of a task spec: ``kws-synth:de?speakers=16,24,24``, ``glyphs:fine?images=30,60,100``,
``<any task>?shots=8``.

Every option is declared once, by the loader it belongs to, as a :class:`SpecOption`:
its name, how many comma-separated counts it takes, the largest count it accepts and,
for an option that makes data, an estimate of the bytes the task would then hold.
:func:`parse_options` is the one place a spec's options are read; it checks each count
against its maximum and the estimate against :data:`MAX_TASK_BYTES` before any data is
generated or read, so a small spec cannot start hours of generation or ask numpy for
more memory than the machine has. Each refusal is one line naming the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from swr.errors import SwrError

#: The most memory a task asked for through its spec's options may hold (its splits as
#: float32 tensors). The defaults of every suite hold well under 1% of it.
MAX_TASK_BYTES = 2 * 1024**3


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


@dataclass(frozen=True)
class SpecOption:
    """One ``?name=N[,N...]`` option of a task spec.

    ``counts``: how many comma-separated values it takes (``(1,)``, ``(3, 4)``);
    ``maximum``: the largest value of each, in ``unit`` (``"speakers per split"``);
    ``meaning``: what the values are, said when their form is wrong; ``example``:
    values that work; ``estimate``: for an option that makes data, ``(bytes, what)``
    the task would hold given the spec's base (a language, a target) and the values,
    e.g. ``(2.3e9, "144000 clips")``, checked against :data:`MAX_TASK_BYTES`.
    """

    name: str
    counts: tuple[int, ...]
    maximum: int
    unit: str
    meaning: str
    example: str
    estimate: Optional[Callable[[str, tuple[int, ...]], tuple[float, str]]] = None

    def check(self, values, spec: str, base: str = "") -> tuple[int, ...]:
        """``values`` as a tuple of ints once each is a positive integer within
        :attr:`maximum` and the estimate fits :data:`MAX_TASK_BYTES`; else
        :class:`SwrError` naming ``spec`` and the limit. Used by the spec parser and by
        the loaders' Python arguments alike."""
        values = tuple(values)
        if len(values) not in self.counts or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise self.form_error(spec)
        big = max(values)
        if big > self.maximum:
            raise self.limit_error(spec, str(big))
        if self.estimate is not None:
            size, what = self.estimate(base, values)
            if size > MAX_TASK_BYTES:
                raise SwrError(f"task {spec!r} would hold about {_gib(size)} ({what}), above "
                               f"the limit of {_gib(MAX_TASK_BYTES)} per task; ask for fewer "
                               f"{self.name}, {self.for_example(spec)}")
        return values

    def for_example(self, spec: str) -> str:
        return f"e.g. {spec.split('?')[0]}?{self.name}={self.example}"

    def limit_error(self, spec: str, value: str) -> SwrError:
        """The line for a value above :attr:`maximum`."""
        shown = value if len(value) <= 20 else value[:17] + "..."
        return SwrError(f"task {spec!r}: {self.name} {shown} is above the limit of "
                        f"{self.maximum} {self.unit}; ask for at most {self.maximum}, "
                        f"{self.for_example(spec)}")

    def form_error(self, spec: str) -> SwrError:
        """The line for values not of this option's form."""
        form = ("a positive integer" if self.counts == (1,) else
                f"the {self.meaning} as {' or '.join(map(str, self.counts))} comma-separated "
                "positive integers")
        return SwrError(f"task {spec!r}: {self.name} must be {form}, {self.for_example(spec)}")


#: ``?shots=N``, taken by every task: at most N training examples per class. It only
#: ever takes fewer examples, so its maximum keeps the number readable, nothing more.
SHOTS = SpecOption("shots", (1,), 100_000, "examples per class",
                   "the training examples per class", "8")


def parse_values(option: SpecOption, text: str, spec: str, base: str = "") -> tuple[int, ...]:
    """The counts written as ``text`` (``"16,24,24"``), checked by ``option``."""
    parts = text.split(",")
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise option.form_error(spec)
    huge = next((p for p in parts if len(p.lstrip("0")) > 18), None)
    if huge is not None:  # never made an int: Python refuses str -> int past 4300 digits
        raise option.limit_error(spec, huge.lstrip("0"))
    return option.check(tuple(int(p) for p in parts), spec, base)


def parse_options(spec: str, rest: str, declared: Mapping[str, SpecOption]
                  ) -> tuple[str, dict[str, tuple[int, ...]]]:
    """``(base, {name: values})`` of ``rest``, the part of ``spec`` after its kind
    (``de?speakers=16,24,24`` -> ``("de", {"speakers": (16, 24, 24)})``).

    Every ``?name=value`` after the base must name an option in ``declared``; each is
    checked (:meth:`SpecOption.check`) before the caller does any work.
    """
    base, *modifiers = rest.split("?")
    found: dict[str, tuple[int, ...]] = {}
    for modifier in modifiers:
        name, sep, value = modifier.partition("=")
        if name not in declared or not sep:
            known = "; ".join(f"?{o.name}= (the {o.meaning}), {o.for_example(spec)}"
                              for o in declared.values())
            raise SwrError(f"task {spec!r}: unknown option {('?' + modifier)!r}; this task "
                           f"takes {known or 'no options'}; and any task ?shots=N, last")
        if name in found:
            raise SwrError(f"task {spec!r} gives ?{name}= twice; give it once")
        found[name] = parse_values(declared[name], value, spec, base)
    return base, found
