from pathlib import Path

from enduro.config import ServerConfig
from enduro.server.app import build_context
from enduro.server.engine_client import ModelInfo
from enduro.tokenizer import Tokenizer
from tests.conftest import build_tiny_tokenizer
from tests.server.fakes import ScriptedEngine


def test_chat_replies_stop_at_the_end_of_turn_tokens_the_vocabulary_has(tmp_path: Path) -> None:
    hf_tokenizer = build_tiny_tokenizer()
    hf_tokenizer.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    hf_tokenizer.save_pretrained(tmp_path)
    tokenizer = Tokenizer(tmp_path)
    end_of_turn = tokenizer.token_id("<end_of_turn>")
    assert end_of_turn is not None
    assert tokenizer.token_id("<|im_end|>") is None
    info = ModelInfo("/models/scripted", 1024, 512, (2,), None, 256, 4, "float32")
    context = build_context(ScriptedEngine(info, [5]), tokenizer, info, ServerConfig())
    assert context.chat_stop_token_ids == (end_of_turn,)
