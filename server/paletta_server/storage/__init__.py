"""Assets on disk, content addressed."""

from paletta_server.storage.assets import AssetInfo, AssetStore, parse_asset_name

__all__ = ["AssetInfo", "AssetStore", "parse_asset_name"]
