#!/usr/bin/env bash
# Download Llama 2 weights with the presigned URL Meta sends by email.
#
# Same flow as Meta's reference download.sh, plus: non-interactive use, resumable
# downloads (FILE.part, renamed when complete), skipping files already present,
# and clear errors for expired URLs / missing files / network failures.
# Written for bash 3.2+ (macOS /bin/bash), so no bash-4-only features.
set -euo pipefail

# ---- Subcommand dispatch point ----------------------------------------------
# `./download.sh demo ARGS...` hands over to the demo CLI (module llama.demo).
# Add further subcommands here, before any download logic runs.
if [[ "${1:-}" == "demo" ]]; then
  # Works from a checkout without installing: the package sits beside this script.
  PYTHONPATH="$(cd "$(dirname "$0")" && pwd)${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m llama.demo "${@:2}"
fi
# -----------------------------------------------------------------------------

readonly ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"

usage() {
  cat <<'EOF'
Usage: download.sh [--url URL] [--models LIST] [--target DIR]
       download.sh demo [ARGS...]      (runs: python3 -m llama.demo ARGS...)

Downloads Llama 2 weights using the presigned URL from Meta's email.

Options (flags win over environment variables):
  --url URL       presigned URL from the email; must contain '*'   [env PRESIGNED_URL]
  --models LIST   comma-separated, no spaces: 7B,13B,70B,7B-chat,13B-chat,70B-chat,
                  or 'all'                                         [env MODEL_SIZE]
  --target DIR    destination folder (default: .)                  [env TARGET_FOLDER]
  -h, --help      show this help

Anything not given is asked for on stdin (at the model prompt, an empty answer
means all models). If stdin is closed or not a terminal and gives no answer, the
script fails instead of waiting forever.

Behaviour:
  * Each file is fetched into FILE.part (resumable) and renamed to FILE only once
    complete; rerunning after an interruption resumes the .part file.
  * Files already present (complete) are not downloaded again; every file in a
    checklist is md5-verified on every run. Nothing is ever deleted by this script,
    and a FILE.part that is a symbolic link is refused, never written through.
  * On a checksum mismatch the remaining models are still downloaded and checked;
    the bad files are listed at the end. Delete them and rerun to fetch them again.
  * A download error (expired URL, missing file, network) stops the run; rerun to
    resume.

Exit status: 0 all verified, 1 checksum mismatch, 2 usage error, 3 download error.

Tuning (env): LLAMA_DOWNLOADER=curl|wget (default: curl if installed),
  LLAMA_RETRIES (network retries per file, default 3), LLAMA_RETRY_DELAY (seconds,
  default 5), LLAMA_READ_TIMEOUT (seconds to wait for piped answers, default 10);
  plain numbers only (the delay and timeout may have a decimal point).
EOF
}

info() { printf '%s\n' "$*"; }
err() { printf 'error: %s\n' "$*" >&2; }
die_usage() {
  err "$*"
  echo "Run 'download.sh --help' for usage." >&2
  exit 2
}

# ---- Arguments / environment --------------------------------------------------
# Numbers from the environment are checked before any use: bash evaluates the text of a
# variable inside (( )) as an expression, so LLAMA_RETRIES='x[$(cmd)]' would run cmd.
number_env() { # number_env NAME DEFAULT whole|decimal: sets NAME to its checked value
  local value=${!1:-$2} pattern='^[0-9]{1,9}$'
  [[ $3 == decimal ]] && pattern='^[0-9]{1,9}([.][0-9]{1,9})?$'
  [[ $value =~ $pattern ]] ||
    die_usage "$1='$value' must be a $3 number of at most 9 digits (e.g. $2); unset it to use the default ($2)"
  [[ $3 == whole ]] && value=$((10#$value)) # 08 is eight, not a bad octal number
  printf -v "$1" '%s' "$value"
}

url=${PRESIGNED_URL:-}
models=${MODEL_SIZE:-}
target=${TARGET_FOLDER:-.}

while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --url | --models | --target)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --url) url=$2 ;;
        --models) models=$2 ;;
        --target) target=$2 ;;
      esac
      shift 2
      ;;
    --url=*) url=${1#*=} && shift ;;
    --models=*) models=${1#*=} && shift ;;
    --target=*) target=${1#*=} && shift ;;
    *) die_usage "unknown argument: $1" ;;
  esac
done

number_env LLAMA_RETRIES 3 whole
number_env LLAMA_RETRY_DELAY 5 decimal
number_env LLAMA_READ_TIMEOUT 10 decimal

# Ask for a missing value. A terminal gets Meta's prompt; a pipe is read with a
# timeout so a never-closing stdin cannot hang the script. Returns 1 on EOF/timeout.
ask() { # ask VAR PROMPT
  local answer=""
  if [[ -t 0 ]]; then
    read -r -p "$2" answer || [[ -n $answer ]] || return 1
  else
    read -r -t "$LLAMA_READ_TIMEOUT" answer || [[ -n $answer ]] || return 1
  fi
  printf -v "$1" '%s' "$answer"
}

if [[ -z $url ]]; then
  ask url "Enter the URL from email: " ||
    die_usage "no presigned URL given (stdin closed or not a terminal); pass --url URL or set PRESIGNED_URL"
  [[ -t 0 ]] && echo ""
fi
# Pasted URLs often carry stray spaces/CRs; a real URL has no whitespace.
url=${url//[[:space:]]/}
[[ -n $url ]] || die_usage "the presigned URL is empty"
[[ $url == *'*'* ]] || die_usage "the URL must contain '*' (use the URL from Meta's email unchanged)"

if [[ -z $models ]]; then
  ask models "Enter the list of models to download without spaces (${ALL_MODELS}), or press Enter for all: " ||
    die_usage "no model list given (stdin closed or not a terminal); pass --models LIST (e.g. 7B or all) or set MODEL_SIZE"
  [[ -n $models ]] || models=all
fi
models=${models//[[:space:]]/}

# Model name -> "directory shard_count"; accepts 7b as well as 7B.
model_info() {
  case $1 in
    7[bB]) echo "llama-2-7b 1" ;;
    13[bB]) echo "llama-2-13b 2" ;;
    70[bB]) echo "llama-2-70b 8" ;;
    7[bB]-[cC][hH][aA][tT]) echo "llama-2-7b-chat 1" ;;
    13[bB]-[cC][hH][aA][tT]) echo "llama-2-13b-chat 2" ;;
    70[bB]-[cC][hH][aA][tT]) echo "llama-2-70b-chat 8" ;;
    *) return 1 ;;
  esac
}

case $models in all | ALL | All) models=$ALL_MODELS ;; esac
# Validate every name before downloading anything.
selected="" # newline-separated "dir shards" entries, deduplicated
IFS=, read -r -a requested <<<"$models"
for m in ${requested[@]+"${requested[@]}"}; do
  [[ -n $m ]] || continue
  entry=$(model_info "$m") ||
    die_usage "unknown model '$m'; valid names: ${ALL_MODELS//,/, } (or 'all')"
  case $'\n'$selected in *$'\n'"$entry"$'\n'*) continue ;; esac
  selected+="$entry"$'\n'
done
[[ -n $selected ]] || die_usage "no models selected"

# ---- Tools -------------------------------------------------------------------
downloader=${LLAMA_DOWNLOADER:-}
if [[ -z $downloader ]]; then
  # curl first: it reports exact HTTP status codes and ships with macOS.
  if command -v curl >/dev/null 2>&1; then
    downloader=curl
  elif command -v wget >/dev/null 2>&1; then
    downloader=wget
  else
    err "neither curl nor wget is installed"
    exit 2
  fi
fi
case $downloader in
  curl | wget) command -v "$downloader" >/dev/null 2>&1 || die_usage "$downloader is not installed" ;;
  *) die_usage "LLAMA_DOWNLOADER must be curl or wget, not '$downloader'" ;;
esac

# md5sum (Linux) or md5 -r (macOS, what Meta uses on arm64); both print "HASH name".
if command -v md5sum >/dev/null 2>&1; then
  md5_cmd=(md5sum --)
elif command -v md5 >/dev/null 2>&1; then
  md5_cmd=(md5 -r)
else
  err "neither md5sum nor md5 is installed"
  exit 2
fi
md5_of() {
  local out
  out=$("${md5_cmd[@]}" "$1") || return 1
  out=${out#\\} # md5sum prefixes '\' when the name has special characters
  printf '%s\n' "${out%% *}" | tr 'A-F' 'a-f'
}

work_dir=$(mktemp -d "${TMPDIR:-/tmp}/llama-download.XXXXXX")
trap 'rm -rf "$work_dir"' EXIT
# A Ctrl-C leaves FILE.part behind on purpose: the next run resumes it.
trap 'echo "" >&2; err "interrupted; rerun the same command to resume"; exit 130' INT TERM

# Never show the signed query string (it is a credential until it expires).
redact() {
  case $1 in
    *\?*) printf '%s?<redacted>\n' "${1%%\?*}" ;;
    *) printf '%s\n' "$1" ;;
  esac
}

# ---- Downloading ---------------------------------------------------------------
# Each fetch_* sets http_status ("" or "000" if no HTTP answer) and returns the
# tool's exit code; output goes to the .part file, resuming it if present.
http_status=""

fetch_curl() { # fetch_curl URL PART
  local rc=0
  local -a progress=(--silent)
  # Progress bar only for humans; curl's error texts never contain the URL.
  [[ -t 2 ]] && progress=(--progress-bar)
  http_status=$(curl "${progress[@]}" --show-error --location --fail \
    --continue-at - --output "$2" --write-out '%{http_code}' -- "$1" </dev/null) || rc=$?
  # 416 on a resume = the .part already holds the whole file (killed before the
  # rename); md5 verification catches the rare case where that is not true.
  if ((rc == 22)) && [[ $http_status == 416 && -s $2 ]]; then
    rc=0
  fi
  # 33 = server ignored the Range header; signal "restart from zero".
  ((rc == 33)) && http_status=restart
  return "$rc"
}

fetch_wget() { # fetch_wget URL PART
  local rc=0 log="$work_dir/wget.log"
  # wget prints the full signed URL, so its log is parsed, never shown.
  wget --no-verbose --continue --tries=1 --output-document="$2" -- "$1" </dev/null 2>"$log" || rc=$?
  http_status=$(sed -n 's/.*ERROR \([0-9][0-9][0-9]\).*/\1/p' "$log" | tail -n 1)
  grep -q 'Refusing to truncate' "$log" && http_status=restart
  return "$rc"
}

# fetch REL_PATH: download URL('*' -> REL_PATH) to TARGET/REL_PATH via .part.
fetch() {
  local rel=$1 dest="$target/$1" part="$target/$1.part"
  local src shown rc attempt=0
  src=${url/\*/"$rel"}
  shown=$(redact "$src")

  # A renamed file is complete by construction; its md5 is checked later.
  if [[ -f $dest ]]; then
    info "  $rel: already present, not downloading again"
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  # Never write through a link or into something that is not a plain file: a planted
  # FILE.part -> ~/.bashrc would otherwise get the download appended to its target.
  if [[ -L $part || (-e $part && ! -f $part) ]]; then
    err "$rel.part is a symbolic link or not a regular file; refusing to write through it. Remove $part and rerun."
    exit 3
  fi

  while :; do
    if [[ -s $part ]]; then
      info "  $rel: resuming ($(wc -c <"$part" | tr -d ' ') bytes already in $rel.part)"
    else
      info "  $rel: downloading"
    fi
    rc=0
    "fetch_$downloader" "$src" "$part" || rc=$?
    if ((rc == 0)); then
      mv -f "$part" "$dest"
      return 0
    fi
    # An empty .part is just noise; a non-empty one is kept for resuming.
    [[ -s $part ]] || rm -f "$part"

    case $http_status in
      403)
        err "HTTP 403 for $rel: the presigned URL has expired or is invalid; request a new one from Meta and rerun with it (downloaded files are kept)."
        exit 3
        ;;
      404)
        err "HTTP 404: $rel was not found on the server ($shown). Check the model list against what your email grants."
        exit 3
        ;;
      restart)
        # Server cannot resume: the partial data is unusable, start over.
        info "  $rel: server does not support resuming; restarting from zero"
        rm -f "$part"
        continue # not counted as a retry: without a .part this cannot recur
        ;;
      4[0-9][0-9])
        err "HTTP $http_status while downloading $rel from $shown"
        exit 3
        ;;
    esac

    attempt=$((attempt + 1))
    if ((attempt > LLAMA_RETRIES)); then
      # A 2xx status with a failed transfer is a dropped connection, not an HTTP error.
      if [[ $http_status =~ ^[45][0-9][0-9]$ ]]; then
        err "HTTP $http_status while downloading $rel from $shown"
      else
        err "network error downloading $rel from $shown ($downloader exit code $rc; the transfer was cut off or never started)"
      fi
      [[ -s $part ]] && echo "Partial data kept in $part; rerun to resume." >&2
      exit 3
    fi
    info "  $rel: download failed ($downloader exit code $rc, HTTP ${http_status:-none}); retry $attempt/$LLAMA_RETRIES"
    sleep "$LLAMA_RETRY_DELAY"
  done
}

# ---- Verification --------------------------------------------------------------
failed="" # newline-separated list of files that failed verification

# verify DIR CHECKLIST: check every "md5  name" line of DIR/CHECKLIST (md5sum format).
verify() {
  local dir=$1 chk=$1/$2 line sum name actual rel
  info "Checking checksums in ${chk#./}"
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%$'\r'}
    [[ -n ${line//[[:space:]]/} ]] || continue
    sum=$(printf '%s' "${line:0:32}" | tr 'A-F' 'a-f')
    name=${line:34}
    # Reject malformed lines and paths escaping DIR rather than trusting them.
    if [[ ! $sum =~ ^[0-9a-f]{32}$ || ${line:32:1} != " " || -z $name ||
      $name == /* || $name == ../* || $name == */../* || $name == .. ]]; then
      err "malformed line in $chk: $line"
      failed+="$chk (malformed)"$'\n'
      continue
    fi
    rel="${dir#./}/$name"
    rel=${rel#./}
    if [[ ! -f "$dir/$name" ]]; then
      err "FAILED: $rel is missing"
      failed+="$rel (missing)"$'\n'
      continue
    fi
    actual=$(md5_of "$dir/$name")
    if [[ $actual == "$sum" ]]; then
      info "  $rel: OK"
    else
      err "FAILED: $rel md5 mismatch (expected $sum, got $actual)"
      failed+="$rel"$'\n'
    fi
  done <"$chk"
}

# ---- Main ----------------------------------------------------------------------
mkdir -p "$target"
info "Downloading LICENSE and Acceptable Usage Policy"
fetch LICENSE
fetch USE_POLICY.md

info "Downloading tokenizer"
fetch tokenizer.model
fetch tokenizer_checklist.chk
verify "$target" tokenizer_checklist.chk

while read -r model_dir shards; do
  [[ -n $model_dir ]] || continue
  info "Downloading $model_dir"
  for ((s = 0; s < shards; s++)); do
    fetch "$model_dir/$(printf 'consolidated.%02d.pth' "$s")"
  done
  fetch "$model_dir/params.json"
  fetch "$model_dir/checklist.chk"
  verify "$target/$model_dir" checklist.chk
done <<<"$selected"

if [[ -n $failed ]]; then
  {
    echo ""
    echo "Checksum verification FAILED for:"
    printf '%s' "$failed" | sed 's/^/  /'
    echo "These files were kept. Delete them and rerun this script to download them again."
  } >&2
  exit 1
fi
info "All files downloaded and verified in $target"
