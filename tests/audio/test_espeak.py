"""eSpeak NG synthesis is a pure function of its arguments, whatever ran before, whenever."""

import time

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")

from dml_jax.audio.espeak import Espeak
from tests._subprocess import run_with_devices

# A breathy variant (noise from eSpeak's own generator, which espeak_Initialize seeds with the
# wall clock), a Klatt voice and the target's slow, high Klatt voice.
CASES = (
    ("forward", dict(voice="en-us+f2", rate=175, pitch=60, pitch_range=60, wordgap=1)),
    ("six", dict(voice="en-us+klatt2", rate=170, pitch=44, pitch_range=45)),
    ("house", dict(voice="en-us+klatt4", rate=85, pitch=95, pitch_range=90, wordgap=3)),
)


def test_same_bytes_in_a_fresh_process_and_after_other_syntheses_in_another_second(tmp_path):
    out = tmp_path / "fresh"
    stamp = run_with_devices(f"""
        import time
        import numpy as np
        from dml_jax.audio.espeak import Espeak
        from tests.audio.test_espeak import CASES
        e = Espeak()
        np.savez({str(out)!r}, *[e.synthesize(t, **kw) for t, kw in CASES])
        print(int(time.time()))
    """, num_devices=1)
    fresh = np.load(f"{out}.npz")
    fresh = [fresh[f"arr_{i}"] for i in range(len(CASES))]
    e = Espeak()
    # other voices, rates and texts first
    for voice, rate in (("en+f4", 300), ("en-gb-scotland+m2", 90), ("en-us+f2", 450),
                        ("en-029+f1", 120), ("en-us+klatt", 200)):
        e.synthesize("backward zero happy", voice=voice, rate=rate, pitch=80, wordgap=5)
    while int(time.time()) == int(stamp.split()[-1]):  # not in the subprocess's second
        time.sleep(0.05)
    for (text, kw), want in zip(CASES, fresh):
        got = e.synthesize(text, **kw)
        assert got.dtype == np.int16 and got.tobytes() == want.tobytes(), (text, kw)
    time.sleep(1.0)  # and again one second later, in the same process
    for (text, kw), want in zip(CASES, fresh):
        assert e.synthesize(text, **kw).tobytes() == want.tobytes(), (text, kw)
