"""Ranks converting the same GGUF at once: the one that loses the rename takes the winner's
folder."""

from selfevo import models


class _Saves:
    def __init__(self, on_save=None):
        self.config = type("Config", (), {})()
        self.on_save = on_save

    def save_pretrained(self, folder, **kwargs):
        (folder / "config.json").write_text("{}")
        if self.on_save:
            self.on_save()


def test_conversion_that_loses_the_rename_returns_the_winners_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFEVO_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = []

    def other_rank_wins():  # another process renames its finished folder into place first
        (folder,) = (tmp_path / "cache" / "models").glob(".m-*")
        winner = folder.parent / folder.name[1:].rsplit(".", 1)[0]
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')
        (winner / "model.safetensors").write_text("")
        target.append(winner)

    monkeypatch.setattr(
        models.AutoTokenizer, "from_pretrained", lambda *a, **k: _Saves(other_rank_wins)
    )
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _Saves())
    folder = models._converted_gguf(gguf, False)
    assert folder == target[0] and (folder / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in folder.parent.iterdir()] == [
        folder.name
    ]  # the loser's temporary folder is gone
