"""A minimal ctypes driver of the eSpeak NG library shipped by the ``espeakng-loader`` wheel.

``pip install espeakng-loader`` installs ``libespeak-ng`` and its ``espeak-ng-data`` folder
inside the Python package (``espeakng_loader.get_library_path()`` / ``get_data_path()``);
nothing is downloaded and no system package is needed. eSpeak NG keeps one synthesiser per
process (a C-level singleton): :class:`Espeak` initialises it once in synchronous mode and
collects the samples of each :meth:`Espeak.synthesize` call through a callback. Not
thread-safe.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_PARAMS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _load() -> tuple[Any, str]:
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Speech synthesis needs the espeakng-loader package: pip install 'dml_jax[audio]' "
            "(or pip install espeakng-loader)."
        ) from e
    return ctypes.CDLL(espeakng_loader.get_library_path()), espeakng_loader.get_data_path()


class Espeak:
    """The process's eSpeak NG synthesiser (int16 mono at :attr:`sample_rate`, 22050 Hz).

    Holds the library handle and the samples of the call in progress.

    Raises:
      RuntimeError: the library fails to initialise.
    """

    def __init__(self):
        lib, data = _load()
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (data path {data}).")
        self.sample_rate = int(rate)
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept alive as long as self
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n, events) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synthesize(self, text: str, *, voice: str, rate: int = 175, pitch: int = 50,
                   pitch_range: int = 50, wordgap: int = 0) -> np.ndarray:
        """Speaks ``text`` with ``voice`` (e.g. ``"en-us+m3"``); returns int16 ``[T]``.

        ``rate`` in words per minute (80-450), ``pitch`` and ``pitch_range`` in 0-100,
        ``wordgap`` in units of 10 ms. Deterministic for equal arguments.

        Raises:
          ValueError: an unknown voice, or eSpeak returns an error or no audio.
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}.")
        for name, value in (("rate", rate), ("pitch", pitch), ("range", pitch_range),
                            ("wordgap", wordgap)):
            self._lib.espeak_SetParameter(_PARAMS[name], int(value), 0)
        self._chunks = []
        data = text.encode()
        err = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, 0, None, None)
        self._lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise ValueError(f"eSpeak NG failed to speak {text!r} with voice {voice!r}.")
        out = np.concatenate(self._chunks)
        self._chunks = []
        return out
