"""Chat with images: the one path that does not run on the batching engine.

``ImageChat`` owns the model's ``mmproj`` (llama-cpp-python's MTMD handler) and generates
on the high-level ``Llama`` of the model, one request at a time (the backend holds its
lock). A request's prompt is the chat template's text with the media marker where each
image goes: the text between markers is tokenized by the backend's ``PromptBuilder``
(client text never becomes control tokens), each image is tokenized and encoded by MTMD
from its bytes alone (never a URL or path: the library's handlers would ``urlopen``
them), and both are evaluated in order with the prefill abort armed, so a cancel stops
even a long prompt or an image's decode. Each answer token is picked by the engine's
``Sampler`` from the last logits and evaluated with ``Llama.eval``; the tokens come out as
the engine's events (``TextPiece``, ``Finished``) for the same chunker.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nexa.backend import CancelToken
from nexa.errors import BadRequest, Cancelled, ModelLoadError
from nexa.text import Shielded
from nexa.types import ImagePart, Sampling
from nexa_llama_cpp.context_size import ContextLayout
from nexa_llama_cpp.engine.records import Event, Finished, TextPiece
from nexa_llama_cpp.engine.sampler import Sampler, Scratch
from nexa_llama_cpp.native import PrefillAbort
from nexa_llama_cpp.prompt import PromptBuilder, fit_context


class ImageChat:
    """Image chats on one loaded ``Llama`` with its mmproj (one at a time)."""

    def __init__(self, llama: Any, mmproj: Path, limit: ContextLayout, *, use_gpu: bool) -> None:
        import llama_cpp.llama_cpp as lib
        import llama_cpp.mtmd_cpp as mtmd_cpp
        from llama_cpp.llama_chat_format import MTMDChatHandler

        class BytesOnlyMTMD(MTMDChatHandler):
            def load_image(self, image_url: str) -> bytes:
                # The library fetches any non-data URL with urlopen (local files, SSRF).
                # This backend hands it decoded bytes only; anything else is refused.
                if not image_url.startswith("data:"):
                    raise BadRequest("images reach the model only as data URIs")
                return super().load_image(image_url)

        handler = BytesOnlyMTMD(clip_model_path=str(mmproj), verbose=False, use_gpu=use_gpu)
        try:
            handler._init_mtmd_context(llama)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"the mmproj {mmproj.name} could not be loaded: {exc}") from exc
        self._llama = llama
        self.limit = limit
        """The context of a request (the ``Llama``'s own is as long)."""
        self.handler = handler
        self.media_marker = mtmd_cpp.mtmd_default_marker().decode("utf-8")
        """MTMD's placeholder: the template renders it where each image goes."""
        self._abort = PrefillAbort(lib, llama._ctx.ctx)
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self._scratch: Scratch | None = None

    def close(self) -> None:
        """Stop the abort watcher (after the ``Llama``, which frees the MTMD context, is closed)."""
        self._abort.close()

    def generate(
        self,
        prompt: str,
        shielded: Shielded,
        images: Sequence[ImagePart],
        builder: PromptBuilder,
        sampling: Sampling,
        grammar: str | None,
        cancel: CancelToken,
        *,
        logprobs: int | None = None,
        steer: Callable[[int], Sequence[int]] | None = None,
        render_special: bool = False,
    ) -> tuple[int, Iterator[Event]]:
        """Evaluate the prompt with its images (now); its token count and the answer's
        events, token by token (the generator; closing it stops generating). Tokens are
        picked by the engine's ``Sampler`` (bias, penalties, grammar, seed, logprobs,
        forced tokens), the same as text chats."""
        import llama_cpp.llama_cpp as lib

        llama = self._llama
        n_vocab = llama.n_vocab()

        def piece(token: int) -> bytes:
            return self._piece(token, render_special)

        # Made first: a bad grammar or logit bias is refused before any work.
        sampler = Sampler(lib, llama._model.vocab, n_vocab, sampling, grammar, logprobs=logprobs,
                          token_bytes=piece, steer=steer)
        try:
            n_prompt, sampling = self._prefill(prompt, shielded, images, builder, sampling, cancel)
        except BaseException:
            sampler.free()
            raise
        if sampler.needs_scratch and (self._scratch is None or self._scratch.ids.size != n_vocab):
            self._scratch = Scratch(lib, n_vocab)
        return n_prompt, self._events(sampler, piece, n_prompt, sampling.max_tokens or 1, cancel)

    def _events(self, sampler: Sampler, piece: Callable[[int], bytes], n_prompt: int, max_tokens: int,
                cancel: CancelToken) -> Iterator[Event]:
        import llama_cpp

        llama = self._llama
        vocab = llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        n = unreported = 0
        reason = "length"
        try:
            while True:
                # Checked before each decode: a disconnect costs at most this token.
                cancel.raise_if_cancelled()
                # The logits of the last evaluated token (the prompt's, then each answer token's).
                token = sampler.sample(llama._ctx.ctx, -1, self._scratch)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = "stop"
                    break
                n += 1
                unreported += 1
                text = decoder.decode(piece(token))
                if text or sampler.logprobs is not None and n >= max_tokens:
                    yield TextPiece(text, unreported, sampler.take_logprobs())
                    unreported = 0
                if n >= max_tokens:
                    break
                llama.eval([token])
        finally:
            sampler.free()
        # The bytes of a character cut short by max_tokens are dropped, never shown as U+FFFD.
        yield Finished(reason, n_prompt, n)

    # --- the prompt ---------------------------------------------------------------------

    def _prefill(
        self,
        prompt: str,
        shielded: Shielded,
        images: Sequence[ImagePart],
        builder: PromptBuilder,
        sampling: Sampling,
        cancel: CancelToken,
    ) -> tuple[int, Sampling]:
        """Tokenize text and images, check the context, evaluate them into the KV cache.
        Returns the prompt's token count and ``sampling`` capped to the room left."""
        llama = self._llama
        with self._tokenized(prompt, shielded, images, builder) as (text_tokens, parts, total):
            sampling = fit_context(sampling, total, self.limit)
            # Image positions leave stale ids in input_ids: the cache is never reused.
            llama.reset()
            llama._ctx.kv_cache_clear()
            for i, tokens in enumerate(text_tokens):
                self._eval_text(tokens, cancel)
                if i < len(parts):
                    for chunk in parts[i]:
                        self._eval_chunk(chunk, cancel)
            return total, sampling

    def count_tokens(self, prompt: str, shielded: Shielded, images: Sequence[ImagePart], builder: PromptBuilder) -> int:
        """The prompt's tokens, images included, as ``generate`` counts them (nothing evaluated)."""
        with self._tokenized(prompt, shielded, images, builder) as (_text, _parts, total):
            return total

    @contextlib.contextmanager
    def _tokenized(
        self, prompt: str, shielded: Shielded, images: Sequence[ImagePart], builder: PromptBuilder
    ) -> Iterator[tuple[list[list[int]], list[list[Any]], int]]:
        """The text's token lists, each image's MTMD chunks and the total token count;
        the native chunks and bitmaps are freed on leaving."""
        import llama_cpp.mtmd_cpp as mtmd

        text_tokens = self.text_tokens(prompt, shielded, builder, len(images))
        bitmaps: list[Any] = []
        chunk_lists: list[Any] = []
        try:
            for i, image in enumerate(images):
                try:
                    bitmaps.append(self.handler._create_bitmap_from_bytes(image.data))
                except ValueError as exc:
                    raise BadRequest(f"image {i + 1} could not be decoded ({image.mime})", param="messages") from exc
                chunk_lists.append(self._tokenize_image(bitmaps[-1]))
            parts = [[c for c in (mtmd.mtmd_input_chunks_get(chunks, j) for j in
                      range(mtmd.mtmd_input_chunks_size(chunks))) if c] for chunks in chunk_lists]
            total = sum(len(t) for t in text_tokens) + sum(
                mtmd.mtmd_input_chunk_get_n_tokens(c) for chunk in parts for c in chunk
            )
            yield text_tokens, parts, total
        finally:
            for chunks in chunk_lists:
                mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def text_tokens(self, prompt: str, shielded: Shielded, builder: PromptBuilder, n_images: int) -> list[list[int]]:
        """The token ids of the text before, between and after the images' markers, each
        tokenized as MTMD does (separately; BOS only at the start), client text kept plain."""
        texts = prompt.split(self.media_marker)
        if len(texts) != n_images + 1:
            raise BadRequest(
                "the number of images does not match the image markers in the "
                f"prompt (do not write {self.media_marker!r} in text)",
                param="messages",
            )
        return [builder.tokenize(text, shielded, at_start=i == 0) for i, text in enumerate(texts)]

    def _tokenize_image(self, bitmap: Any) -> Any:
        """MTMD's chunks for one image: its tokens plus the model's begin/end-of-image text."""
        import llama_cpp.mtmd_cpp as mtmd

        text = self.media_marker.encode("utf-8")
        input_text = mtmd.mtmd_input_text()
        input_text.text = text
        input_text.text_len = len(text)
        input_text.add_special = False
        input_text.parse_special = True
        chunks = mtmd.mtmd_input_chunks_init()
        if chunks is None:
            raise RuntimeError("mtmd_input_chunks_init failed")
        array = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mtmd.mtmd_tokenize(self.handler.mtmd_ctx, chunks, ctypes.byref(input_text), array, 1)
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise BadRequest(f"the image could not be preprocessed (code {rc})", param="messages")
        return chunks

    def _eval_text(self, tokens: list[int], cancel: CancelToken) -> None:
        llama = self._llama
        for start in range(0, len(tokens), llama.n_batch):
            cancel.raise_if_cancelled()
            self._eval(tokens[start : start + llama.n_batch], cancel)

    def _eval_chunk(self, chunk: Any, cancel: CancelToken) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        llama = self._llama
        cancel.raise_if_cancelled()
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            count = ctypes.c_size_t()
            ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
            self._eval_text([ptr[j] for j in range(count.value)], cancel)
            return
        new_past = llama_cpp.llama_pos(0)
        # The abort stops the image tokens' decode into the model (the vision encoder
        # itself runs on its own context, unarmed).
        with self._abort.armed(lambda: cancel.cancelled):
            rc = mtmd.mtmd_helper_eval_chunk_single(
                self.handler.mtmd_ctx, llama._ctx.ctx, chunk,
                llama_cpp.llama_pos(llama.n_tokens), llama_cpp.llama_seq_id(0),
                llama.n_batch, False, ctypes.byref(new_past),
            )
        if rc != 0:
            if cancel.cancelled:
                self._after_abort()
                raise Cancelled()
            raise RuntimeError(f"llama.cpp failed to evaluate an image ({rc})")
        llama.n_tokens = new_past.value

    def _eval(self, tokens: list[int], cancel: CancelToken) -> None:
        """``Llama.eval`` of prompt tokens that a cancel stops mid-batch (the abort callback,
        armed for prompt batches only)."""
        try:
            with self._abort.armed(lambda: cancel.cancelled):
                self._llama.eval(tokens)
        except RuntimeError:
            if not cancel.cancelled:
                raise
            self._after_abort()
            raise Cancelled() from None

    def _after_abort(self) -> None:
        # An aborted decode leaves n_tokens/input_ids at the last whole batch; make the
        # KV cache say the same.
        llama = self._llama
        llama._ctx.kv_cache_seq_rm(-1, llama.n_tokens, -1)

    def _piece(self, token: int, special: bool) -> bytes:
        piece = self._pieces.get((token, special))
        if piece is None:
            import llama_cpp

            vocab = self._llama._model.vocab
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, special)
            piece = buf.raw[:n]
            self._pieces[(token, special)] = piece
        return piece
