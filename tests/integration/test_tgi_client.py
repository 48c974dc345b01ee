"""The `text-generation` 0.7.0 client (TGI's own Python client) against the live server.

It needs huggingface-hub < 1.0, which cannot live beside transformers 5, so it runs in its own small venv.
"""

import json
import subprocess
import textwrap
import venv

import pytest

from tests.conftest import Live

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import json, sys
    from text_generation import Client
    client = Client(sys.argv[1], timeout=60)
    done = client.generate(sys.argv[2], max_new_tokens=8)  # this client always asks for details
    tokens = [r.token.text for r in client.generate_stream(sys.argv[2], max_new_tokens=8) if not r.token.special]
    last = list(client.generate_stream(sys.argv[2], max_new_tokens=8))[-1]
    print(json.dumps({"text": done.generated_text, "finish": str(done.details.finish_reason),
                      "n": done.details.generated_tokens, "stream": "".join(tokens),
                      "stream_final": last.generated_text}))
""")


@pytest.fixture(scope="module")
def tg_python(tmp_path_factory):
    env_dir = tmp_path_factory.mktemp("tg-venv")
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "text-generation==0.7.0", "huggingface-hub<1.0"], check=True, timeout=600
    )
    return python


def test_text_generation_client_generate_and_stream(tg_python, tiny_base):
    from tests.conftest import server_app

    with Live(server_app(str(tiny_base), max_total_tokens=256)) as live:
        prompt = "I lost my card"
        expected = live.text(prompt, max_new_tokens=8)
        out = subprocess.run([tg_python, "-c", SCRIPT, live.url, prompt], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["text"] == expected == result["stream_final"]
    assert result["stream"] == expected
    assert result["n"] == 8 and result["finish"] == "FinishReason.Length"
