"""nexa-faster-whisper: speech to text (``/v1/audio/transcriptions``) with faster-whisper."""

__version__ = "0.1.0"
