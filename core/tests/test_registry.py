"""Backend selection: pin > supports() > priority > name, with every refusal explained."""

from __future__ import annotations

import pytest

from nexa.backend import Backend
from nexa.errors import NoBackend
from nexa.plugins import load_plugins
from nexa.registry import BackendRegistry
from nexa.testing import StaticPlugin
from nexa.types import Device, Manifest, Task

CPU = Device("cpu")


def manifest(**kw):
    base = dict(name="org/m", format="gguf", tasks={Task.CHAT})
    base.update(kw)
    return Manifest(**base)


def backend(name, priority=0, formats=("gguf",), devices=("cpu",), refuse=None):
    return type(
        name.title(),
        (Backend,),
        {
            "name": name,
            "tasks": frozenset({Task.CHAT}),
            "formats": frozenset(formats),
            "devices": frozenset(devices),
            "priority": priority,
            "supports": classmethod(lambda cls, m, d: refuse),
        },
    )


def registry(*classes, pin=None):
    return BackendRegistry(load_plugins(load_entry_points=False, extra_plugins=[StaticPlugin(classes)]), pin=pin)


def test_priority_then_name_decide_not_registration_order():
    a, b, c = backend("alpha", 1), backend("beta", 5), backend("gamma", 5)
    assert registry(a, b, c).select(Task.CHAT, manifest(), CPU).name == "beta"
    assert registry(c, b, a).select(Task.CHAT, manifest(), CPU).name == "beta"


def test_supports_refusal_skips_backend():
    good, picky = backend("good", 0), backend("picky", 10, refuse="needs a GPU")
    assert registry(good, picky).select(Task.CHAT, manifest(), CPU).name == "good"


def test_pin_beats_priority_and_manifest_hint_pins():
    low, high = backend("low", 0), backend("high", 10)
    assert registry(low, high, pin="low").select(Task.CHAT, manifest(), CPU).name == "low"
    assert registry(low, high).select(Task.CHAT, manifest(backend="low"), CPU).name == "low"


def test_no_backend_lists_every_candidate_and_reason():
    a = backend("a", formats=("mlx",))
    b = backend("b", devices=("cuda",))
    c = backend("c", refuse="vision needs an mmproj file")
    with pytest.raises(NoBackend) as info:
        registry(a, b, c).select(Task.CHAT, manifest(), CPU)
    message = info.value.message
    assert "a: format 'gguf' not in ['mlx']" in message
    assert "b: device 'cpu' not in ['cuda']" in message
    assert "c: vision needs an mmproj file" in message


def test_pinned_backend_missing_is_explained():
    with pytest.raises(NoBackend, match="pinned backend 'mlx' is not installed"):
        registry(backend("a"), pin="mlx").select(Task.CHAT, manifest(), CPU)


def test_task_without_backends():
    with pytest.raises(NoBackend, match="no installed backend serves task 'embed'"):
        registry(backend("a")).select(Task.EMBED, manifest(tasks={Task.EMBED}), CPU)


def test_supports_that_raises_is_a_refusal():
    def boom(cls, m, d):
        raise RuntimeError("bug")

    broken = type("Broken", (Backend,), {"name": "broken", "tasks": frozenset({Task.CHAT}),
                                          "formats": frozenset({"gguf"}), "supports": classmethod(boom)})
    with pytest.raises(NoBackend, match="supports\\(\\) raised RuntimeError: bug"):
        registry(broken).select(Task.CHAT, manifest(), CPU)


def test_listing_shows_one_line_per_name_with_what_all_its_classes_serve():
    text = backend("twin", 1)
    vision = type("TwinVision", (text,), {"tasks": frozenset({Task.CHAT, Task.VLM}), "priority": 2,
                                          "devices": frozenset({"cpu", "metal"})})
    infos = registry(text, vision).infos()
    assert [i.name for i in infos] == ["twin"]
    assert infos[0].tasks == {Task.CHAT, Task.VLM}
    assert infos[0].devices == {"cpu", "metal"}
    assert infos[0].priority == 2
