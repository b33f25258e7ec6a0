//! AV1 recordings exported to WebM (filled in by the AV1 export work).
