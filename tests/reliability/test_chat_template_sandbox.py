"""Chat templates from model files run in a sandbox: CVE-2024-34359-style payloads run no code.

A GGUF's ``tokenizer.chat_template`` is attacker-controlled text (anyone can publish a
model). llama-cpp-python < 0.2.72 rendered it with a plain Jinja environment, so a
template could reach ``os`` through Python internals and run commands (CVE-2024-34359).
Here each payload is put in a tiny GGUF, imported into the store as a user would, and
asked to chat through the real server and the llama.cpp plugin: the request must get an
OpenAI-shaped 400 and no payload may leave its marker file.
"""

from __future__ import annotations

import httpx
import pytest

import relkit
from nexa.testing import serve

pytestmark = pytest.mark.smollm2

# Each payload tries to create the file MARKER; several routes to os/subprocess/builtins.
PAYLOADS = {
    "cve-2024-34359": (
        "{% for x in ().__class__.__base__.__subclasses__() %}{% if \"warning\" in x.__name__ %}"
        "{{ x()._module.__builtins__['__import__']('os').system('touch MARKER') }}"
        "{% endif %}{% endfor %}"
    ),
    "cycler-globals": "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "joiner-globals": "{{ joiner.__init__.__globals__['os'].popen('touch MARKER').read() }}",
    "lipsum-globals": "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "namespace-globals": "{{ namespace.__init__.__globals__['sys'].modules['os'].system('touch MARKER') }}",
    "raise-exception-globals": "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch MARKER') }}",
    "format-string": "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}{{ cycler.__init__.__globals__ }}",
    "str-format-attribute": "{{ ('{0.__globals__[os]}').format(lipsum) }}",
    "mro-subclasses-popen": (
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        "{{ c(['touch', 'MARKER']) }}{% endif %}{% endfor %}"
    ),
    "messages-mutation": (
        "{% set x = messages.append({'role': 'user', 'content': 'injected'}) %}{{ messages }}"
        "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    ),
    "file-open": "{{ self.__init__.__globals__.__builtins__.open('MARKER', 'w').write('x') }}",
}


@pytest.fixture(scope="module")
def tiny_writer():
    reason = relkit.llama_plugin_missing()
    if reason:
        pytest.skip(reason)
    from nexa_llama_cpp.testing import write_tiny_llama

    return write_tiny_llama


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_template_payload_runs_no_code(tiny_writer, home, tmp_path, name):
    marker = tmp_path / f"pwned-{name}"
    template = PAYLOADS[name].replace("MARKER", str(marker))
    gguf = tiny_writer(tmp_path / f"evil-{name}.gguf", chat_template=template)
    with serve(home=home, load_entry_points=True) as server:
        server.store.import_path(gguf, name=f"evil/{name}")
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
            "model": f"evil/{name}", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]})
        # Refused as the model's fault, for this request only.
        relkit.assert_error(r, 400, None, tmp_path, home)
        for stream in (True, False):  # the server stays usable either way
            ok = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
                "model": relkit.SMOLLM2, "max_tokens": 2, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]})
            assert ok.status_code == 200, ok.text
    assert not marker.exists(), f"the {name} template ran code"


def test_a_normal_template_still_works(tiny_writer, home, tmp_path):
    """The control: the same route with an ordinary ChatML template answers."""
    gguf = tiny_writer(tmp_path / "fine.gguf")
    with serve(home=home, load_entry_points=True) as server:
        server.store.import_path(gguf, name="ok/tiny")
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
            "model": "ok/tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200, r.text
        relkit.check_chat_completion(r.json())
