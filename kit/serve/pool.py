"""The models one `kit serve` offers: one base in memory plus any number of PEFT adapters on it.

The base loads once; each adapter is attached with `PeftModel.load_adapter` under its own name and
chosen per request (`set_adapter`); the base itself answers inside `disable_adapter()`. Every
adapter's card must name this very base (same fingerprint) — checked before any weights load.
One lock serialises generation: adapter selection is model-wide state. Requests that arrive
together for the same name are generated as one batch (kit.serve.batching).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftModel

from kit.base.folder import AdapterInfo, Base
from kit.base.load import load_base
from kit.core import options
from kit.core.cards import Card
from kit.core.errors import KitError
from kit.core.precision import compute_dtype, default_device
from kit.data.prompt_spec import PromptSpec
from kit.infer.load import base_form, folder_kind, open_folder, processor_for
from kit.infer.prompts import prepare
from kit.serve.batching import BatchedAnswer, Batcher


@dataclass
class Served:
    """One name a client can ask for."""

    name: str
    kind: str  # 'base' | 'model' | 'adapter'
    path: str
    processor: Any
    spec: PromptSpec
    adapter: str | None = None  # the PEFT adapter name inside the shared model; None for the base
    notes: list[str] = field(default_factory=list)


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """'name=path' or 'path' (named after its folder)."""
    name, sep, path = spec.partition("=")
    if sep and name and path and "/" not in name:
        return name, Path(path)
    p = Path(spec)
    return p.resolve().name, p


class ModelPool:
    """Served models by name, all sharing `model`. Use `start()` to answer a conversation."""

    def __init__(self, model, served: dict[str, Served], device: str = "cpu", max_batch: int = options.MAX_BATCH):
        self.model = model
        self.served = served
        self.device = device
        self.lock = threading.Lock()  # one generate call at a time: one model, one active adapter
        self.tokenize_lock = threading.Lock()  # fast tokenizers refuse concurrent use
        self.batcher = Batcher(model, lambda name: self.served[name].processor.tokenizer, self.selected, lock=self.lock,
                               max_batch=max_batch)

    @property
    def names(self) -> list[str]:
        return list(self.served)

    def get(self, name: str) -> Served:
        """KeyError for a name not served."""
        return self.served[name]

    @contextlib.contextmanager
    def selected(self, name: str):
        """The shared model answering as `name` (hold `lock`)."""
        s = self.served[name]
        if s.adapter is None:
            ctx = self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext()
            with ctx:
                yield
        else:
            self.model.set_adapter(s.adapter)
            yield

    def prepare(self, name: str, messages: list[dict[str, Any]], images: list) -> dict[str, Any]:
        """Model inputs for a conversation (see kit.infer.prompts.prepare); KitError if it cannot be rendered."""
        s = self.served[name]
        with self.tokenize_lock:
            return prepare(s.processor, s.spec, messages, images=images)

    def max_positions(self) -> int | None:
        cfg = getattr(self.model, "config", None)
        text = getattr(cfg, "text_config", None) or cfg
        return getattr(text, "max_position_embeddings", None)

    def close(self) -> None:
        """Stop generating (the running batch ends first); the pool answers nothing afterwards."""
        self.batcher.close()

    def start(self, name: str, inputs: dict[str, Any], sampling):
        """The answer to prepared inputs (a kit.infer.generation.Answer), generated in the next
        batch of requests for `name`."""
        s = self.served[name]
        return self.batcher.submit(BatchedAnswer(name, s.processor.tokenizer, inputs, sampling=sampling))


def adapters_on(base: Base, specs: list[tuple[str, Path]], opened: AdapterInfo | None = None) -> list[tuple[str, AdapterInfo]]:
    """Each (name, folder) opened as an adapter of `base` (`opened`: one already open). KitError for
    a full model, a name taken (the base's folder name included), or an adapter trained on another base."""
    names = [base.path.resolve().name]
    plans: list[tuple[str, AdapterInfo]] = []
    for name, path in specs:
        if folder_kind(path) != "adapter":
            raise KitError(f"{path} is a full model, not an adapter: one server holds one base; give adapters after the base")
        if name in names:
            raise KitError(f"two served models are named '{name}'; name them apart with NAME=PATH (e.g. {name}-2={path})")
        names.append(name)
        adapter = opened if opened is not None and opened.path == path else AdapterInfo.open(path)
        trained_on = adapter.base
        same = trained_on.fingerprint == base.fingerprint if adapter.has_card else trained_on.path.resolve() == base.path.resolve()
        if not same:
            raise KitError(
                f"adapter {path} was trained on base {trained_on.path} (fingerprint {trained_on.fingerprint}), not on the served base "
                f"{base.path} (fingerprint {base.fingerprint}); serve it with its own base: kit serve {trained_on.path} {path}"
            )
        plans.append((name, adapter))
    return plans


def load_pool(model_or_adapter: Path, adapters: list[str] = (), dtype: str = "auto", echo=print, max_batch: int = options.MAX_BATCH) -> ModelPool:
    """Load the base (MODEL_OR_ADAPTER itself, or the base an adapter names) once and attach every adapter.

    Names, in the order they are listed: each adapter's folder name (or NAME=PATH), then the base's folder name. Raises KitError for
    folders kit cannot load, duplicate names, or an adapter trained on another base — before loading weights.
    """
    torch_dtype = compute_dtype(dtype, option="--dtype")
    first = Path(model_or_adapter)
    specs = [parse_adapter_spec(a) for a in adapters]
    folder = open_folder(first)
    opened = folder if isinstance(folder, AdapterInfo) else None
    if opened is not None:
        base = opened.base
        specs.insert(0, (first.resolve().name, first))
    else:
        base = folder
    base_name = base.path.resolve().name
    plans = adapters_on(base, specs, opened)

    quants = {adapter.quantization for _, adapter in plans}
    device = default_device()
    # One base serves every adapter: 4-bit only when all of them were trained on the 4-bit base.
    form = base_form("nf4" if quants == {"nf4"} else "none", device)
    notes = []
    if "nf4" in quants and form == "full":
        notes.append("some adapters were trained against a 4-bit (nf4) base; it is loaded unquantized here, so answers can differ slightly")
    model = load_base(base, torch_dtype, form, device=device)
    base_card = base.card or Card(kind="model")
    served = {}
    for i, (name, adapter) in enumerate(plans):
        internal = f"adapter_{i}"  # folder names may hold characters PEFT's module names cannot
        if i == 0:
            model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name=internal)
        else:
            model.load_adapter(str(adapter.path), adapter_name=internal)
        processor = processor_for(adapter.path, base)
        s = Served(name, "adapter", str(adapter.path), processor=processor,
                   spec=PromptSpec.of_card(adapter.card, processor, base.family, base_aspect=base.image_aspect), adapter=internal)
        if not adapter.has_card:
            s.notes.append(f"{adapter.path} has no kit.json card: the base's fingerprint could not be checked")
        served[name] = s
        echo(f"loaded adapter {name} from {adapter.path}")
    # The adapters come first (and a client's menu selects the first): serving an adapter means
    # talking to it, with the base one choice further down.
    processor = processor_for(base.path, None)
    served[base_name] = Served(base_name, "base" if base_card.kind == "base" else "model", str(base.path), processor=processor,
                               spec=PromptSpec.of_card(base_card, processor, base.family, base_aspect=base.image_aspect))
    model.eval()
    for note in notes + [n for s in served.values() for n in s.notes]:
        echo(f"note: {note}")
    return ModelPool(model, served, device=device.type, max_batch=max_batch)
