"""A minimal ctypes driver of the eSpeak NG library shipped by the ``espeakng-loader`` wheel.

``pip install espeakng-loader`` installs ``libespeak-ng`` and its ``espeak-ng-data`` folder
inside the Python package (``espeakng_loader.get_library_path()`` / ``get_data_path()``);
nothing is downloaded and no system package is needed. :class:`Espeak` runs the library in
synchronous mode and collects the samples of each call through a callback.
"""

from __future__ import annotations

import ctypes

import numpy as np

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_PARAMS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _paths() -> tuple[str, str]:
    """``(library path, data path)`` of the installed espeakng-loader wheel."""
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Speech synthesis needs the espeakng-loader package: pip install 'dml_jax[audio]' "
            "(or pip install espeakng-loader)."
        ) from e
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


class Espeak:
    """eSpeak NG speech synthesis, deterministic per call (int16 mono at :attr:`sample_rate`).

    eSpeak NG keeps synthesis state in C globals across calls (e.g. its pitch-flutter phase)
    and draws noise (breath of the ``f2``/``f3``/``f5`` variants, Klatt frication) from its
    own generator, which ``espeak_Initialize`` seeds with the wall clock (``time(NULL)``), so
    the same text spoken in two different seconds differs. To make every utterance a pure
    function of its arguments, :meth:`synthesize` loads a fresh instance of the library
    (``dlopen``), initialises it, reseeds its generator (``espeak_ng_SetRandSeed(0)``, eSpeak
    NG >= 1.51), seeds the C library's ``rand()`` that some wave generators use (``srand(0)``:
    this resets the process's C-level ``rand`` sequence, which Python and NumPy do not use),
    speaks, terminates and unloads it (``dlclose``): a few milliseconds per call. Holds the
    samples of the call in progress. Not thread-safe.

    Raises:
      RuntimeError: the library fails to initialise.
    """

    def __init__(self):
        self._lib_path, data = _paths()
        self._data = data.encode()
        lib = self._open()
        try:
            self.sample_rate = self._initialise(lib)
        finally:
            self._close(lib)

    def _open(self):
        lib = ctypes.CDLL(self._lib_path)
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        return lib

    def _initialise(self, lib) -> int:
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self._data, 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (data path {self._data.decode()}).")
        # espeak_Initialize seeds eSpeak's noise generator with time(NULL); reseed it. Older
        # libraries (< 1.51) have no own generator and draw from rand(), seeded in synthesize.
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = None
            lib.espeak_ng_SetRandSeed(0)
        return int(rate)

    @staticmethod
    def _close(lib) -> None:
        import _ctypes

        lib.espeak_Terminate()
        _ctypes.dlclose(lib._handle)

    def synthesize(self, text: str, *, voice: str, rate: int = 175, pitch: int = 50,
                   pitch_range: int = 50, wordgap: int = 0) -> np.ndarray:
        """Speaks ``text`` with ``voice`` (e.g. ``"en-us+m3"``); returns int16 ``[T]``.

        ``rate`` in words per minute (80-450), ``pitch`` and ``pitch_range`` in 0-100,
        ``wordgap`` in units of 10 ms. Equal arguments give equal samples.

        Raises:
          ValueError: an unknown voice, or eSpeak returns an error or no audio.
        """
        chunks: list[np.ndarray] = []

        def collect(wav, n, events) -> int:
            if n > 0 and wav:
                chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        callback = _CALLBACK(collect)
        lib = self._open()
        try:
            self._initialise(lib)
            ctypes.CDLL(None).srand(0)
            lib.espeak_SetSynthCallback(callback)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"eSpeak NG has no voice {voice!r}.")
            for name, value in (("rate", rate), ("pitch", pitch), ("range", pitch_range),
                                ("wordgap", wordgap)):
                lib.espeak_SetParameter(_PARAMS[name], int(value), 0)
            data = text.encode()
            err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, 0, None, None)
            lib.espeak_Synchronize()
        finally:
            self._close(lib)
        if err != 0 or not chunks:
            raise ValueError(f"eSpeak NG failed to speak {text!r} with voice {voice!r}.")
        return np.concatenate(chunks)
