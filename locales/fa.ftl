# هر متنی که کاربر تلگرام می‌بیند، به فارسی.
# Every text a Telegram user sees, in Persian. Read by src/telegram/words.rs;
# numbers are written with Persian digits (۰–۹), placeholders are isolated
# (FSI…PDI) so Latin model names, ids and prompts keep their direction.
# Commands stay as written (/image, /queue, /cancel, /help) and start their
# own line, so right-to-left layout never shows "/help" as "help/".

## The command menu (setMyCommands, language_code "fa").

command-image = ساختن تصویر: /image=<model>=<prompt>
command-queue = درخواست‌های شما و نوبتشان
command-cancel = لغو درخواست‌هایی که در صف‌اند
command-presets = پیش‌تنظیم‌ها: /image=<model>=<preset>=<prompt>
command-model = مدلی که /image <prompt> به کار می‌برد: /model <name>
command-help = راهنمای این ربات

## /help, /start and the usage hint.

help =
    من توضیح شما را به تصویر تبدیل می‌کنم.

    بنویسید:
    /image=<model>=<آنچه می‌خواهید ببینید>{ $model-count ->
        [0] {""}
       *[other] {""}
            برای نمونه:
            { $example }
    }

    مدل‌ها: { $models }

    مدلی را برایتان به خاطر بسپارم تا از آن پس فقط توضیح را بنویسید:
    /model <name>{ $max-images ->
        [1] {""}
       *[other] {""}
            چند تصویر با هم (تا { $max-images } تصویر، در یک آلبوم):
            /image=<model>*3=<prompt>
    }
    درخواست‌های شما و نوبتشان:
    /queue
    لغو درخواست‌هایی که هنوز شروع نشده‌اند (یا فقط یکی، با شناسه‌اش):
    /cancel
    /cancel <id>{ $preset-count ->
        [0] {""}
       *[other] {""}
            پیش‌تنظیم‌ها، سبک‌هایی که می‌توانید بین مدل و توضیح بنویسید:
            /presets
    }

    زیر هر تصویر، { $again } همان توضیح را یک بار دیگر می‌کشد و { $original } فایل تصویر را بدون فشرده‌سازی می‌فرستد.

    هر توضیح حداکثر { $max-chars } نویسه دارد. می‌توانید { $count } بار در { $window } درخواست بدهید و حداکثر { $pending } درخواست هم‌زمان در انتظار داشته باشید.

    پیش از کشیدن، توضیح شما را بهتر می‌کنم (به انگلیسی، که مدل‌های تصویر بهتر می‌فهمند)؛ تصویر همراه با توضیحی که به کار رفت می‌رسد.
usage =
    بنویسید:
    /image=<model>=<توضیح تصویر>{ $model-count ->
        [0] {""}
       *[other] {""}
            برای نمونه:
            { $example }
    }

    مدل‌ها: { $models }
example-prompt-help = روباهی سرخ در برف، در نور طلایی غروب
example-prompt-usage = روباهی سرخ در برف
models-none = فعلاً هیچ مدلی راه‌اندازی نشده است
list-separator = {"، "}

## Durations.

span-seconds = { $n } ثانیه
span-minutes = { $n } دقیقه
span-hours = { $n } ساعت

## /presets

presets-none = هیچ پیش‌تنظیمی راه‌اندازی نشده است.
presets-header = پیش‌تنظیم‌ها: نام یکی را بین مدل و توضیح بنویسید.
preset-line = • { $name }{ $only ->
        [0] {""}
       *[other] {" "}(فقط { $models })
    }: { $example }

## /model

model-chosen-is = مدل شما: { $model }. این دستور با آن می‌کشد: /image <prompt>
model-default-is = هنوز مدلی انتخاب نکرده‌اید؛ این دستور با { $model } می‌کشد: /image <prompt>
model-none = فعلاً هیچ مدلی راه‌اندازی نشده است.
model-choices =
    مدل‌ها: { $models }. برای انتخاب، نام مدل را بعد از این دستور بفرستید:
    /model
model-set = از این پس این دستور با { $model } می‌کشد: /image <prompt>

## Image to image.

no-input-image = { $model } نمی‌تواند از روی عکس بکشد. { $able ->
        [0] هیچ مدلی در اینجا نمی‌تواند.
       *[other] مدل‌هایی که می‌توانند: { $models }.
    }
input-too-big = این عکس از { $max } مگابایت بزرگ‌تر است، بیشتر از آنچه می‌توانم از تلگرام بگیرم.
input-unreadable = نتوانستم این عکس را بگیرم. لطفاً دوباره بفرستید.
input-expired = عکسی که آن درخواست از رویش کشیده شد دیگر نگه داشته نمی‌شود. لطفاً دوباره بفرستید.

## Refusals.

unknown-command =
    این دستور را نمی‌شناسم. راهنما:
    /help
not-allowed = متأسفم، این ربات خصوصی است.
unknown-model = مدلی به نام «{ $asked }» وجود ندارد. مدل‌های موجود: { $models }.
not-configured = ساختن تصویر با { $model } در حال حاضر راه‌اندازی نشده است.
empty-prompt = توضیح تصویر خالی است. بعد از = دوم بنویسید چه می‌خواهید ببینید.
preset-not-for-model = پیش‌تنظیم { $preset } فقط برای { $models } است.
prompt-too-long-preset = با پیش‌تنظیم { $preset } توضیح { $chars } نویسه می‌شود و حداکثر { $max } نویسه مجاز است. لطفاً کوتاه‌ترش کنید.
prompt-too-long = توضیح شما { $chars } نویسه دارد و حداکثر { $max } نویسه مجاز است. لطفاً کوتاه‌ترش کنید.
rate-limited = درخواست‌ها را خیلی سریع می‌فرستید. لطفاً { $secs } ثانیه دیگر دوباره امتحان کنید.
too-many-pending =
    همین حالا { $max } درخواست در انتظار دارید. لطفاً صبر کنید تا یکی تمام شود، یا لغو کنید:
    /cancel
busy = متأسفم، الان نتوانستم این درخواست را بپذیرم. لطفاً یک دقیقه دیگر دوباره امتحان کنید.

## The status message, edited as the request moves on.

queued = در صف { $model } — نوبت { $position }
queued-wait = در صف { $model } — نوبت { $position } (حدود { $wait })
status = { $model }: { $stage }
generating-retry = { $model }: در حال ساختن تصویر… تلاش دوباره { $retry } از { $of }
stage-queued = در صف
stage-enhancing = در حال بهتر کردن توضیح…
stage-generating = در حال ساختن تصویر…
stage-sending = در حال فرستادن…
stage-done = انجام شد ✅
stage-failed = ناموفق.
stage-cancelled = لغو شد.
failed = { $model }: ناموفق — { $why }
why-rejected = فیلتر محتوای مدل این توضیح را نپذیرفت. آن را به شکل دیگری بنویسید.
why-unavailable = سرویس ساخت تصویر الان در دسترس نیست. لطفاً کمی بعد دوباره امتحان کنید.
why-timed-out = سرویس ساخت تصویر بیش از حد طول کشید. لطفاً کمی بعد دوباره امتحان کنید.
why-bad-answer = پاسخ سرویس ساخت تصویر، تصویر نبود. لطفاً دوباره امتحان کنید.
# Said only when no operator alert about this model went out.
why-refused = سرویس ساخت تصویر درخواست را رد کرد. اگر باز هم پیش آمد، لطفاً به گرداننده‌ی ربات خبر دهید.
# Said exactly when an operator alert about this model went out.
why-refused-told = سرویس ساخت تصویر درخواست را رد کرد. به گرداننده‌ی ربات خبر داده شد.
operator-told = به گرداننده‌ی ربات خبر داده شد.
why-not-configured = ساختن تصویر با این مدل در حال حاضر راه‌اندازی نشده است.
why-delivery = تلگرام تصویر را نپذیرفت.
why-internal = مشکلی در سمت ما پیش آمد. لطفاً دوباره امتحان کنید.
cancelled-one = { $model }: لغو شد.
generating-image = { $model }: در حال ساختن تصویر { $index } از { $of }…
album-footer = 🎨 { $model } · { $kept } از { $of } تصویر
album-image-failed = تصویر { $index } ساخته نشد: { $why }
variations-range =
    می‌توانید ۲ تا { $max } تصویر بخواهید، برای نمونه:
    /image=flux*3=a cat
variations-off = این ربات برای هر درخواست یک تصویر می‌سازد.
already-done = آن درخواست تمام شده است.

## /cancel

cancelled = { $n ->
        [0] درخواستی در صف ندارید که لغو شود (درخواستی که شروع شده لغو نمی‌شود).
       *[other] { $n } درخواست در صف لغو شد.
    }
cancel-ambiguous =
    «{ $prefix }» با { $n } درخواست در صف شما جور درمی‌آید، پس هیچ‌کدام را لغو نکردم. یکی از این شناسه‌ها را بعد از این دستور بفرستید:
    /cancel
cancel-candidate = • { $id } «{ $prompt }»
nothing-to-cancel-with = شناسه‌ی هیچ‌کدام از درخواست‌های در صف شما با «{ $prefix }» شروع نمی‌شود.

## /queue

no-requests =
    درخواستی در جریان ندارید. راهنمای ساختن تصویر:
    /help
queue-header = درخواست‌های شما:
queue-line =
    • { $id } · { $model } · { $state }
       «{ $prompt }»
queue-position = نوبت { $position }
queue-position-wait = نوبت { $position } (حدود { $wait })

## The delivered image and its buttons.

caption =
    🎨 { $model }
    { $prompt }
caption-as-written =
    🎨 { $model } · توضیح خودتان، همان‌طور که نوشتید
    { $prompt }
full-prompt-follows = توضیح کامل:
again-button = 🔁 دوباره
original-button = 📄 فایل اصلی
original-expired = فایل اصلی دیگر نگه داشته نمی‌شود؛ برای تصویری تازه { $again } را بزنید.
original-sending = در حال فرستادن فایل اصلی…
unknown-button = این دکمه دیگر کار نمی‌کند.
