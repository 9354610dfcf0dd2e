"""The user's raw data as records: sources (COCO, manifest, DICOM, figures), samples, drawn shapes, caption pairs, held-out split."""
