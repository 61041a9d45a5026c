//! Tile requests (`cache_proxy::tiles`): `/tiles/...` paths as a client
//! sends them, checked against fixed sources; a tile that parses gets its
//! cache key, its upstream URL and its PMTiles tile id, which must name it
//! back (`pmtiles::tile_of`). Mode byte 1: a seeding bbox
//! (`W,S,E,N` as the admin API takes it) and the tiles covering it.
#![no_main]

use cache_proxy::pmtiles;
use cache_proxy::tiles::{self, BBox, TileRequest, MAX_ZOOM};
use fieldrack_fuzz::{split_mode, tile_source as source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = split_mode(data) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if mode == 1 {
        let Some((zooms, bbox)) = text.split_once(';') else {
            return;
        };
        let Ok(bbox) = bbox.parse::<BBox>() else {
            return;
        };
        let (lo, hi) = zooms.split_once('-').unwrap_or((zooms, zooms));
        let (Ok(lo), Ok(hi)) = (lo.parse::<u8>(), hi.parse::<u8>()) else {
            return;
        };
        if lo > hi || hi > MAX_ZOOM {
            return;
        }
        let n = tiles::tile_count(&bbox, lo..=hi);
        let walked = tiles::tiles(bbox, lo..=hi).take(4096).count() as u64;
        assert_eq!(walked, n.min(4096), "tile_count disagrees with tiles()");
        return;
    }
    let sources = [
        source("osm", "png", 0, 19, "https://t.example/{z}/{x}/{y}.png"),
        source(
            "vec",
            "pbf",
            2,
            30,
            "https://v.example/{z}/{x}/{-y}.pbf?k=1",
        ),
        source("sat", "jpg", 5, 12, "https://s.example/{y}/{x}/{z}"),
    ];
    let Ok((req, i)) = tiles::parse_path(text, &sources) else {
        return;
    };
    match req {
        TileRequest::TileJson { source } => {
            assert_eq!(source, sources[i].name);
            let _ = tiles::tilejson(&sources[i], "http://10.0.0.1:3128");
        }
        TileRequest::Tile { source, tile, ext } => {
            let s = &sources[i];
            assert_eq!(source, s.name);
            assert!(tile.z >= s.min_zoom && tile.z <= s.max_zoom.min(MAX_ZOOM));
            assert!(s.format.matches_extension(&ext));
            let _ = tiles::cache_key(&source, tile);
            let _ = tiles::upstream_url(&s.url, tile);
            let id = pmtiles::tile_id(tile);
            assert_eq!(
                pmtiles::tile_of(id),
                Some(tile),
                "tile id does not name the tile back"
            );
        }
    }
});
