"""A transcript in each of OpenAI's ``response_format``s: json, text, srt, vtt, verbose_json."""

from __future__ import annotations

import math

from nexa.server import schemas as wire
from nexa.types import Transcript, TranscriptSegment

# Whisper's languages by ISO 639-1 code, named as OpenAI's verbose_json names them.
LANGUAGES = dict(item.split(":") for item in (
    "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese pt:portuguese "
    "tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian id:indonesian hi:hindi "
    "fi:finnish vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay cs:czech ro:romanian da:danish "
    "hu:hungarian ta:tamil no:norwegian th:thai ur:urdu hr:croatian bg:bulgarian lt:lithuanian la:latin "
    "mi:maori ml:malayalam cy:welsh sk:slovak te:telugu fa:persian lv:latvian bn:bengali sr:serbian "
    "az:azerbaijani sl:slovenian kn:kannada et:estonian mk:macedonian br:breton eu:basque is:icelandic "
    "hy:armenian ne:nepali mn:mongolian bs:bosnian kk:kazakh sq:albanian sw:swahili gl:galician "
    "mr:marathi pa:punjabi si:sinhala km:khmer sn:shona yo:yoruba so:somali af:afrikaans oc:occitan "
    "ka:georgian be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic yi:yiddish lo:lao uz:uzbek "
    "fo:faroese ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese sa:sanskrit "
    "lb:luxembourgish my:myanmar bo:tibetan tl:tagalog mg:malagasy as:assamese tt:tatar haw:hawaiian "
    "ln:lingala ha:hausa ba:bashkir jw:javanese su:sundanese yue:cantonese"
).split())


def language_name(code: str) -> str:
    return LANGUAGES.get(code.lower(), code).replace("_", " ")


def usage(transcript: Transcript) -> wire.DurationUsage:
    """Billed as OpenAI bills Whisper: whole seconds of audio, rounded up."""
    return wire.DurationUsage(seconds=max(1, math.ceil(transcript.duration)))


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(segments: tuple[TranscriptSegment, ...]) -> str:
    blocks = [
        f"{n}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
        for n, s in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def vtt(segments: tuple[TranscriptSegment, ...]) -> str:
    blocks = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def verbose(transcript: Transcript, *, translate: bool, segments: bool, words: bool) -> wire.TranscriptionVerbose:
    body = wire.TranscriptionVerbose(
        task="translate" if translate else "transcribe",
        language=language_name(transcript.language),
        duration=round(transcript.duration, 3),
        text=transcript.text,
        usage=usage(transcript),
    )
    if segments:
        body.segments = [
            wire.TranscriptSegmentWire(
                id=s.id, seek=s.seek, start=s.start, end=s.end, text=s.text, tokens=list(s.tokens),
                temperature=s.temperature, avg_logprob=s.avg_logprob,
                compression_ratio=s.compression_ratio, no_speech_prob=s.no_speech_prob,
            )
            for s in transcript.segments
        ]
    if words:
        body.words = [
            wire.TranscriptWord(word=w.word.strip(), start=w.start, end=w.end)
            for s in transcript.segments for w in s.words
        ]
    return body
