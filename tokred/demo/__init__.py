"""`tokred demo`: a Gradio page answering one question with the stock and the patched model side by side.

`tokred.demo.app` holds the page (it imports gradio, the `demo` extra); `overlay`, `media` and `compare` do not.

    from tokred.demo.app import build_app, launch
    url = launch(build_app(model, processor), port=7860)
"""
