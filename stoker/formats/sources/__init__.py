"""Raw inputs for packing: `images` (an ImageNet-style tree), `text` (text files and tokenizers), `files`
(reading a source file, sample keys)."""
