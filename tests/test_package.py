"""Importing monolith_jax loads no native code and changes no JAX setting."""

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_lazy_and_leaves_jax_settings_alone():
    out = run("""
        import sys, jax
        before = {k: getattr(jax.config, k) for k in ("jax_enable_x64", "jax_default_matmul_precision")}
        import monolith_jax
        after = {k: getattr(jax.config, k) for k in before}
        assert before == after, (before, after)
        assert "monolith_jax._engine" not in sys.modules
        t = monolith_jax.EmbeddingTable(monolith_jax.TableConfig("t", 4))
        assert "monolith_jax._engine" in sys.modules
        assert not jax.config.jax_enable_x64
        import jax.numpy as jnp
        print(jnp.asarray(1).dtype)
    """)
    assert out == "int32"


def test_public_api_is_listed():
    import monolith_jax

    for name in monolith_jax.__all__:
        assert hasattr(monolith_jax, name), name
