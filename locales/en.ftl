# Every text a Telegram user sees, in English (the fallback language).
# Read by src/telegram/words.rs, which fills the { $placeholders }.
# Every message here exists in every other locales/*.ftl with the same
# placeholders (a test checks it). Commands stay as written in every
# language: /image, /queue, /cancel, /help.

## The command menu (setMyCommands): at most 256 characters each.

command-image = /image=<model>=<prompt> — make an image
command-queue = your requests and their place in line
command-cancel = cancel your queued requests
command-presets = prompt presets: /image=<model>=<preset>=<prompt>
command-model = the model /image <prompt> uses: /model <name>
command-help = how to use this bot

## /help, /start and the usage hint.

help =
    I turn a description into an image.

    Write /image=<model>=<what you want to see>{ $model-count ->
        [0] {""}
       *[other] , for example:
            { $example }
    }

    Models: { $models }

    /model <name> remembers a model; then /image <what you want to see> is enough.{ $max-images ->
        [1] {""}
       *[other] {""}
            /image=<model>*3=<prompt> makes 3 images at once (up to { $max-images }), sent as one album.
    }
    /queue shows your requests and their place in line.
    /cancel cancels your requests that have not started; /cancel <id> cancels one.{ $preset-count ->
        [0] {""}
       *[other] {""}
            /presets lists the presets: styles you can put between the model and your prompt.
    }

    Under each image, { $again } draws the same prompt once more and { $original } sends the image file uncompressed.

    A prompt may have up to { $max-chars } characters. You can ask { $count } times in { $window }, with up to { $pending } requests waiting at once.

    I improve your prompt before drawing; the image comes with the prompt I used.
usage =
    Write /image=<model>=<prompt>{ $model-count ->
        [0] {""}
       *[other] , for example:
            { $example }
    }

    Models: { $models }
# The prompts of the examples in /help and the usage hint.
example-prompt-help = a red fox in the snow, golden hour
example-prompt-usage = a red fox in the snow
models-none = none is configured right now
list-separator = {", "}

## Durations.

span-seconds = { $n } s
span-minutes = { $n } min
span-hours = { $n } h

## /presets

presets-none = No presets are configured.
presets-header = Presets: write one between the model and your prompt.
preset-line = • { $name }{ $only ->
        [0] {""}
       *[other] {" "}(only { $models })
    }: { $example }

## /model

model-chosen-is = Your model: { $model }. /image <prompt> draws with it.
model-default-is = You have not chosen a model; /image <prompt> draws with { $model }.
model-none = No model is configured right now.
model-choices = Choose one with /model <name>: { $models }.
model-set = From now on /image <prompt> draws with { $model }.

## Image to image: a photo with the command as its caption, or the
## command as a reply to a photo.

no-input-image = { $model } cannot start from a photo. { $able ->
        [0] No model here can.
       *[other] Models that can: { $models }.
    }
input-too-big = That photo is larger than { $max } MB, more than I may fetch from Telegram.
input-unreadable = I could not fetch that photo as an image. Please send it again.
input-expired = The photo that request started from is no longer kept. Please send it again.

## Refusals.

unknown-command = I don't know that command. /help shows what I can do.
not-allowed = Sorry, this bot is private.
unknown-model = There is no model called "{ $asked }". Available: { $models }.
not-configured = Image generation is not configured for { $model } right now.
empty-prompt = The prompt is empty. Write what you want to see after the second =.
preset-not-for-model = Preset { $preset } is only for { $models }.
prompt-too-long-preset = With preset { $preset } the prompt has { $chars } characters; the limit is { $max }. Please shorten it.
prompt-too-long = The prompt has { $chars } characters; the limit is { $max }. Please shorten it.
rate-limited = You're sending requests too fast. Please try again in { $secs } s.
too-many-pending = You already have { $max } requests waiting. Please wait for one to finish, or /cancel.
busy = Sorry, I couldn't take that request right now. Please try again in a minute.

## The status message, edited as the request moves on.

queued = Queued for { $model } — position { $position }
queued-wait = Queued for { $model } — position { $position } (about { $wait })
status = { $model }: { $stage }
generating-retry = { $model }: Generating… retry { $retry } of { $of }
stage-queued = queued
stage-enhancing = Enhancing prompt…
stage-generating = Generating…
stage-sending = Sending…
stage-done = Done ✅
stage-failed = Failed.
stage-cancelled = Cancelled.
failed = { $model }: Failed — { $why }
why-rejected = the model's content filter rejected this prompt. Try rephrasing it.
why-unavailable = the image service is unavailable right now. Please try again later.
why-timed-out = the image service took too long to answer. Please try again later.
why-bad-answer = the image service answered with something that is not an image. Please try again.
# Said only when no operator alert about this model went out.
why-refused = the image service refused the request. If it keeps happening, please tell the bot's operator.
# Said exactly when an operator alert about this model went out (and the
# trouble is still on).
why-refused-told = the image service refused the request. The bot's operator has been told.
operator-told = The bot's operator has been told.
why-not-configured = image generation is not configured for this model right now.
why-delivery = Telegram would not take the image.
why-internal = something went wrong on our side. Please try again.
cancelled-one = { $model }: Cancelled.
generating-image = { $model }: Generating… image { $index } of { $of }
album-footer = 🎨 { $model } · { $kept } of { $of } images
album-image-failed = Image { $index } failed: { $why }
variations-range = Ask for 2 to { $max } images, e.g. /image=flux*3=a cat.
variations-off = This bot makes one image per request.
already-done = That request is already finished.

## /cancel

cancelled = { $n ->
        [0] You have no queued requests to cancel (requests that have started can't be cancelled).
        [one] Cancelled 1 queued request.
       *[other] Cancelled { $n } queued requests.
    }
cancel-ambiguous = "{ $prefix }" matches { $n } of your queued requests, so I cancelled none. Send /cancel with one of these ids:
cancel-candidate = • { $id } “{ $prompt }”
nothing-to-cancel-with = None of your queued requests has an id starting with "{ $prefix }".

## /queue

no-requests = You have no requests in progress. /help shows how to make one.
queue-header = Your requests:
queue-line =
    • { $id } · { $model } · { $state }
       “{ $prompt }”
queue-position = position { $position }
queue-position-wait = position { $position } (about { $wait })

## The delivered image and its buttons.

caption =
    🎨 { $model }
    { $prompt }
caption-as-written =
    🎨 { $model } · your prompt, as written
    { $prompt }
full-prompt-follows = Full prompt:
again-button = 🔁 Again
original-button = 📄 Original
original-expired = The original file has expired; use { $again } to make a new image.
original-sending = Sending the original file…
unknown-button = This button no longer works.
