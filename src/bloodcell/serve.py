"""`bloodcell serve`: a trained run behind a small HTTP API, for lab software that posts cell images.

    GET  /health   the model being served (architecture, classes, image size, version)
    POST /predict  multipart upload of one or more image files -> one record per file plus the
                   differential count, the same JSON as `bloodcell predict --json`

FastAPI validates the requests and writes the OpenAPI docs (/docs); an unreadable file gets a
record with `error` set, as in `predict`, rather than failing the whole request.
"""

from dataclasses import replace
from typing import Annotated

from bloodcell import __version__
from bloodcell.differential import differential
from bloodcell.errors import BloodcellError
from bloodcell.predict import Classifier, PredictOptions

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # per file; a microscope cell image is well under 1 MB
MAX_FILES = 1024  # per request


def create_app(classifier: Classifier, options: PredictOptions | None = None):
    """The FastAPI application for `classifier`; `tta`, `min_confidence` and `top_k` can be set per request."""
    try:
        from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    except ImportError:
        raise BloodcellError("serving needs FastAPI: pip install 'bloodcell[serve]'") from None

    options = options or PredictOptions()
    app = FastAPI(title="bloodcell", version=__version__, summary="Blood-cell image classification (BloodMNIST)")

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "model": classifier.record.arch,
            "classes": classifier.classes,
            "image_size": classifier.image_size,
        }

    @app.post("/predict")
    def predict(  # the server's options are the defaults of the query parameters
        files: Annotated[list[UploadFile], File(description="cell images (JPEG/PNG/BMP/TIFF), one cell each")],
        tta: Annotated[bool, Query(description="average over the 8 flips/rotations")] = options.tta,
        min_confidence: Annotated[
            float, Query(ge=0, le=1, description="flag for review below this")
        ] = options.min_confidence,
        top_k: Annotated[int, Query(ge=1, le=8)] = options.top_k,
    ) -> dict:
        if len(files) > MAX_FILES:
            raise HTTPException(413, f"at most {MAX_FILES} files per request, got {len(files)}")
        uploads = []
        for upload in files:
            content = upload.file.read(MAX_UPLOAD_BYTES + 1)
            if len(content) > MAX_UPLOAD_BYTES:
                raise HTTPException(413, f"{upload.filename}: larger than {MAX_UPLOAD_BYTES // 2**20} MB")
            uploads.append((upload.filename or "upload", content))
        request_options = replace(options, tta=tta, min_confidence=min_confidence, top_k=top_k)
        records = classifier.predict_uploads(uploads, request_options)
        return {"records": records, "summary": differential(records, classifier.classes)}

    return app


def serve(classifier: Classifier, options: PredictOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the API with uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise BloodcellError("serving needs uvicorn: pip install 'bloodcell[serve]'") from None
    uvicorn.run(create_app(classifier, options), host=host, port=port, log_level="info")
